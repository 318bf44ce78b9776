"""A/B experiments: deterministic arm assignment by session or request hash."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from router_worker.config import ArmSpec, ExperimentSpec, RoutingConfig

_SCALE = float(2**64)


def unit_interval(experiment: str, unit: str) -> float:
    """A stable, uniform number in [0, 1) for (experiment, unit)."""
    digest = hashlib.sha256(f"{experiment}\x00{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def assign(experiment: str, spec: ExperimentSpec, unit: str) -> ArmSpec:
    """The arm `unit` belongs to, by the arms' weights."""
    total = sum(arm.weight for arm in spec.arms)
    point = unit_interval(experiment, unit) * total
    for arm in spec.arms:
        point -= arm.weight
        if point < 0:
            return arm
    return spec.arms[-1]


@dataclass(frozen=True, slots=True)
class Assignment:
    """A request's experiment arm and the models it routes over."""

    experiment: str
    arm: str
    policy: str | None
    models: tuple[str, ...] | None


def choose(
    config: RoutingConfig, tenant_id: str, category: str, request_id: str, session_id: str | None,
) -> Assignment | None:
    """The first enabled experiment whose scope covers the request, and its arm."""
    for name, spec in config.experiments.items():
        if not spec.enabled:
            continue
        if spec.tenants is not None and tenant_id not in spec.tenants:
            continue
        if spec.categories is not None and category not in spec.categories:
            continue
        unit = session_id if spec.assign_by == "session" and session_id else request_id
        arm = assign(name, spec, unit)
        return Assignment(name, arm.name, arm.policy, arm.models)
    return None
