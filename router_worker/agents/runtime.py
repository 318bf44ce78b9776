"""What the route agent holds while it runs: engine, enricher, router; built at agent start."""

from __future__ import annotations

import gc
from typing import Any

import structlog

from router_worker.agents.route import Outgoing, Router
from router_worker.classify.cascade import Cascade
from router_worker.classify.engine import Engine
from router_worker.classify.keyword import keyword_engine_from_config
from router_worker.config import load_config
from router_worker.enrich import Enricher
from router_worker.errors import RouterError
from router_worker.metrics import Metrics
from router_worker.settings import Settings
from router_worker.validate import Inbound

log = structlog.get_logger(__name__)


def inbound_from_event(event: Any) -> Inbound:
    """Our view of a Faust event: raw bytes and where they came from."""
    message = event.message
    headers = message.headers or ()
    if isinstance(headers, dict):
        headers = headers.items()
    return Inbound(
        value=message.value, key=message.key,
        headers=tuple((str(k), bytes(v or b"")) for k, v in headers),
        topic=message.topic, partition=message.partition, offset=message.offset,
        timestamp_ms=float(message.timestamp or 0) * 1000,
    )


def _load_engine(settings: Settings) -> tuple[Engine | None, Any, list[str]]:
    """The configured engine and its artifact watcher; (None, None, [why]) when unavailable."""
    if settings.engine == "keyword":
        return None, None, []
    try:
        from router_worker.classify.factory import load_engine, make_watcher

        engine = load_engine(settings)
        return engine, make_watcher(settings, engine), []
    except (RouterError, ImportError, OSError) as exc:
        # Routing must go on without the learned engine; decisions say so in `degraded`.
        log.error("engine_unavailable", engine=settings.engine, error=str(exc)[:500])
        return None, None, ["classifier"]


# Short prompts in the scripts the engines handle differently (ASCII, accented, CJK), for the
# start-up warm-up only.
WARM_UP_PROMPTS = (
    "Write a Python function that merges two sorted lists.",
    "Summarise this article in three bullet points.",
    "¿Puedes traducir esta frase al inglés, por favor?",
    "请解释一下什么是量子计算。",
)


def settle_heap() -> None:
    """Take everything alive now (engine tables, word caches, config) out of the cyclic GC's
    sight.

    Why: a full (generation 2) collection walks every tracked object, and with the classifier
    loaded one took 57-77 ms in the worker, a stall every few seconds under load that shows up
    as tail latency; after this it took 3-5 ms. Frozen objects are still freed by reference
    counting; only cycles among them wait for the next `refreeze_heap`.
    """
    gc.collect()
    gc.freeze()


def refreeze_heap() -> None:
    """After a classifier swap: let the old engine's cycles be collected, then settle again."""
    gc.unfreeze()
    settle_heap()


class RouteRuntime:
    """Owns the route agent's clients; `stop` releases them."""

    def __init__(self, router: Router, enricher: Enricher, watcher: Any, degraded: list[str]):
        self.router = router
        self.enricher = enricher
        self.watcher = watcher
        self.degraded = degraded

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> RouteRuntime:
        """Load config and engine, connect Redis (lazily), build the router."""
        config = load_config(settings.config)
        keyword = keyword_engine_from_config(config)
        engine, watcher, degraded = _load_engine(settings)
        cascade = Cascade(
            engine, keyword, config.thresholds, unavailable=degraded,
            inline_max=settings.classify_inline_max,
        )
        enricher = Enricher(settings.redis_url.get_secret_value(), settings.redis_prefix, config)
        router = Router(settings, config, cascade, enricher, metrics)
        metrics.classifier_info.labels(engine.name if engine else "keyword", cascade.version).set(1)
        log.info("route_agent_started", engine=engine.name if engine else "keyword",
                 classifier_version=cascade.version, config_version=config.version,
                 keyword_scan="compiled" if keyword.native else "regex")
        runtime = cls(router, enricher, watcher, degraded)
        await runtime.warm(settings.route_concurrency)
        settle_heap()
        return runtime

    async def warm(self, connections: int) -> None:
        """Pay the first batch's one-off costs before the agent takes records (and before
        /readyz says ready): Redis connections and Lua script compilation, and the
        classifier's first calls. Nothing is written: the scripts are only loaded, the
        predictions dropped."""
        await self.enricher.warm(connections)
        await self.router.cascade.classify(list(WARM_UP_PROMPTS))

    @property
    def version(self) -> str:
        """The classifier version decisions are stamped with now."""
        return self.router.cascade.version

    def maybe_reload(self) -> None:
        """Swap in a newer artifact between batches, if one appeared."""
        if self.watcher is None:
            return
        engine = self.watcher.maybe_reload()
        if engine is not None:
            self.router.cascade.engine = engine
            refreeze_heap()
            log.info("classifier_reloaded", classifier_version=engine.version)

    async def route(self, batch: list[Inbound]) -> list[Outgoing]:
        """Route one batch; an unexpected bug fails the batch's requests, never drops them."""
        try:
            outgoing = await self.router.route(batch)
        except Exception as exc:  # a bug must not kill the agent or lose the batch
            log.exception("route_batch_crashed", records=len(batch))
            outgoing = self.router.fail_all(batch, exc)
        return outgoing

    async def stop(self) -> None:
        """Release Redis connections."""
        await self.enricher.stop()
