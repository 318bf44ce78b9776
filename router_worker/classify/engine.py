"""The engine interface: a batch of texts in, a batch of predictions out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field
from typing import Protocol, runtime_checkable

from router_worker.events import Tier
from router_worker.frozen import frozen


@frozen
class Prediction:
    """One text's classification: labels, confidence and per-class scores."""

    category: str
    complexity: str
    confidence: float
    scores: Mapping[str, float] = field(default_factory=dict)  # read-only: may be shared
    complexity_confidence: float = 1.0
    tier: Tier = Tier.CLASSIFIER


@runtime_checkable
class Engine(Protocol):
    """A classifier backend. `classify` is batch in, batch out, same order, same length.

    An engine whose work releases the GIL for long stretches (torch, vLLM) may say so with a
    true `releases_gil` attribute: the cascade then classifies in a thread, so the event loop
    runs meanwhile. Without it the engine runs on the event loop (see `Cascade`).
    """

    name: str

    @property
    def version(self) -> str:
        """The artifact version stamped on every decision as `classifier_version`."""
        ...

    def classify(self, texts: list[str]) -> list[Prediction]:
        """Classify a batch; must not do per-item I/O."""
        ...
