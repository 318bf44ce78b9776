"""Stages 4-5: the learned engine first, the keyword tier below its confidence threshold."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog

from router_worker.classify.engine import Engine, Prediction
from router_worker.classify.keyword import KeywordEngine
from router_worker.config import Thresholds

log = structlog.get_logger(__name__)


@dataclass
class CascadeResult:
    """Predictions in input order, and what was unavailable."""

    predictions: list[Prediction]
    degraded: list[str]


class Cascade:
    """Runs the engine on a batch and re-classifies its unsure predictions with keywords."""

    def __init__(
        self, engine: Engine | None, keyword: KeywordEngine, thresholds: Thresholds,
        unavailable: list[str] | None = None, inline_max: int = 0,
    ) -> None:
        self.engine = engine
        # Batches up to this size classify on the event loop. The numpy CPU engine and the
        # keyword tier hold the GIL throughout, so a thread buys no overlap: it only adds
        # hand-offs, each waiting up to the 5 ms GIL switch interval while the loop decides
        # another batch. Measured on two cores, draining a backlog (batches of 512), inline
        # against a thread, alternating: cpu engine 8,927 against 7,656 req/s (three runs
        # each, no overlap), keyword 15,358 against 14,533 (five each, overlapping).
        # Engines that release the GIL (vLLM, torch's encoder stage) always get a thread.
        # The bound (512 by default, the default batch) keeps the stall short: at ~60 us a
        # prompt a batch holds the loop ~30 ms, while a Redis reply due meanwhile must not
        # run into its 250 ms socket timeout.
        self.inline_max = inline_max
        # what never loaded (e.g. ["classifier"]); reported on every decision until it does
        self.unavailable = list(unavailable or [])
        self.keyword = keyword
        self.thresholds = thresholds

    @property
    def version(self) -> str:
        """Version stamped on decisions: the engine's, or the keyword tier's without one."""
        return self.engine.version if self.engine is not None else self.keyword.version

    async def _call(
        self, fn: Callable[[list[str]], list[Prediction]], texts: list[str],
        releases_gil: bool = False,
    ) -> list[Prediction]:
        if len(texts) <= self.inline_max and not releases_gil:
            return fn(texts)
        return await asyncio.to_thread(fn, texts)

    def inline(self, n: int) -> bool:
        """Whether a batch of `n` is classified on the calling thread (`classify_now` may
        take it)."""
        return n <= self.inline_max and not self._releases_gil()

    def _releases_gil(self) -> bool:
        # Asked per call: a hot reload may swap in an engine with or without the encoder
        # stage, and with it whether the work releases the GIL.
        return self.engine is not None and bool(getattr(self.engine, "releases_gil", False))

    def classify_now(self, texts: list[str]) -> CascadeResult:
        """`classify` without an event loop, for a batch `inline` allows.

        Such a batch never awaits anything (every `_call` returns at once), so the coroutine
        runs to its end on its first step; this drives that step.
        """
        if not self.inline(len(texts)):
            raise ValueError(f"a batch of {len(texts)} needs a thread: use classify")
        step = self.classify(texts)
        try:
            step.send(None)
        except StopIteration as done:
            result: CascadeResult = done.value
            return result
        step.close()
        raise RuntimeError("the cascade suspended on an inline batch")

    async def classify(self, texts: list[str]) -> CascadeResult:
        """Classify; large batches off the event loop so the consumer keeps fetching."""
        if not texts:
            return CascadeResult([], [])
        if self.engine is None:
            return CascadeResult(await self._call(self.keyword.classify, texts),
                                 self.unavailable)
        try:
            predictions = await self._call(self.engine.classify, texts, self._releases_gil())
        except Exception as exc:  # any engine fault must degrade, never stop routing
            log.error("engine_failed", engine=self.engine.name, error=repr(exc)[:300])
            return CascadeResult(await self._call(self.keyword.classify, texts),
                                 ["classifier"])
        unsure = [
            i for i, p in enumerate(predictions)
            if p.confidence < self.thresholds.for_category(p.category)
        ]
        if unsure:
            fallback = await self._call(self.keyword.classify, [texts[i] for i in unsure])
            for i, kw in zip(unsure, fallback, strict=True):
                # Keep the engine's complexity: it is learned, the keyword one is a heuristic.
                predictions[i] = replace(kw, complexity=predictions[i].complexity,
                                         complexity_confidence=predictions[i].complexity_confidence)
        return CascadeResult(predictions, [])
