"""Where the cascade runs its engine: small batches on the event loop, large ones in a thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from router_worker.classify.cascade import Cascade
from router_worker.classify.engine import Prediction
from router_worker.classify.keyword import keyword_engine_from_config
from router_worker.config import load_config
from router_worker.settings import Settings


class ThreadRecorder:
    """A sure engine that records which thread classified each batch."""

    version = "test-1"

    def __init__(self, name: str, releases_gil: bool = False) -> None:
        self.name = name
        self.releases_gil = releases_gil
        self.threads: list[str] = []

    def classify(self, texts: list[str]) -> list[Prediction]:
        self.threads.append(threading.current_thread().name)
        return [Prediction("code", "simple", 1.0) for _ in texts]


def _cascade(engine: ThreadRecorder, inline_max: int) -> Cascade:
    config = load_config(Settings().config)
    keyword = keyword_engine_from_config(config)
    return Cascade(engine, keyword, config.thresholds, inline_max=inline_max)


def test_small_batches_classify_on_the_loop_and_large_ones_in_a_thread() -> None:
    engine = ThreadRecorder("cpu")
    cascade = _cascade(engine, inline_max=4)
    asyncio.run(cascade.classify(["fix my python bug"] * 4))
    asyncio.run(cascade.classify(["fix my python bug"] * 5))
    assert engine.threads[0] == threading.main_thread().name
    assert engine.threads[1] != threading.main_thread().name


def test_an_engine_that_releases_the_gil_always_runs_in_a_thread() -> None:
    engine = ThreadRecorder("vllm", releases_gil=True)
    cascade = _cascade(engine, inline_max=64)
    result = asyncio.run(cascade.classify(["fix my python bug"]))
    assert len(engine.threads) == 1
    assert engine.threads[0] != threading.main_thread().name
    assert [p.category for p in result.predictions] == ["code"]


def test_with_default_settings_a_full_batch_of_a_gil_holding_engine_stays_on_the_loop() -> None:
    engine = ThreadRecorder("cpu")
    settings = Settings()
    cascade = _cascade(engine, inline_max=settings.classify_inline_max)
    asyncio.run(cascade.classify(["fix my python bug"] * settings.max_batch))
    assert engine.threads == [threading.main_thread().name]


def test_an_engine_swapped_in_by_a_reload_gets_a_thread_when_it_releases_the_gil() -> None:
    cascade = _cascade(ThreadRecorder("cpu"), inline_max=64)
    swapped = ThreadRecorder("cpu", releases_gil=True)  # e.g. an artifact with the encoder stage
    cascade.engine = swapped
    asyncio.run(cascade.classify(["fix my python bug"]))
    assert swapped.threads[0] != threading.main_thread().name


class Unsure(ThreadRecorder):
    """An engine below every threshold: the cascade asks the keyword tier as well."""

    def classify(self, texts: list[str]) -> list[Prediction]:
        super().classify(texts)
        return [Prediction("chat", "simple", 0.01) for _ in texts]


def test_classify_now_gives_what_classify_gives_without_an_event_loop() -> None:
    texts = ["fix my python bug", "integrate x squared", "hello"]
    for engine in (ThreadRecorder("cpu"), Unsure("cpu")):
        cascade = _cascade(engine, inline_max=4)
        assert cascade.inline(3)
        assert cascade.classify_now(texts) == asyncio.run(cascade.classify(texts))
    assert engine.threads == [threading.main_thread().name] * 2


def test_classify_now_refuses_a_batch_that_needs_a_thread() -> None:
    for engine, size in ((ThreadRecorder("cpu"), 5), (ThreadRecorder("vllm", True), 1)):
        cascade = _cascade(engine, inline_max=4)
        assert not cascade.inline(size)
        with pytest.raises(ValueError, match="needs a thread"):
            cascade.classify_now(["fix my python bug"] * size)
    assert engine.threads == []
