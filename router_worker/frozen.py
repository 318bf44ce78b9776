"""`@frozen`: the per-request value objects' dataclass decorator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def frozen(cls: type[T]) -> type[T]:
    """A slotted dataclass that the type checker treats as frozen.

    Why not `dataclass(frozen=True)`: its `__init__` must go around its own `__setattr__` guard
    with `object.__setattr__` for every field, 1.0 us for ten fields against 0.2 us for a plain
    slotted one, and a request builds about six of these (its inbound record, prediction,
    context, choice, outgoing record...). Immutability is checked where it costs nothing: mypy
    (strict, in CI) rejects any assignment to a field. Unlike `frozen=True`, instances are
    not hashable (eq without frozen sets `__hash__` to None); none of these is a dict key.
    """
    return dataclass(slots=True)(cls)
