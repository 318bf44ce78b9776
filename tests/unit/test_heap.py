"""The route agent freezes its long-lived heap out of the cyclic GC, and thaws it on a swap."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from router_worker.agents.runtime import refreeze_heap, settle_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector can free it


@pytest.fixture(autouse=True)
def _thaw() -> Iterator[None]:
    yield
    gc.unfreeze()
    gc.collect()


def test_settling_takes_live_objects_out_of_the_collectors_sight() -> None:
    settle_heap()
    assert gc.get_freeze_count() > 0


def test_a_cycle_dropped_after_settling_waits_for_the_next_refreeze() -> None:
    node = _Node()
    alive = weakref.ref(node)
    settle_heap()
    del node
    gc.collect()
    assert alive() is not None  # frozen: a full collection does not look at it
    refreeze_heap()
    assert alive() is None  # the swap's refreeze frees the old engine's cycles
