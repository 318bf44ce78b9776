"""The routing config: models, policies, the category x complexity table, tenants, keywords."""

from __future__ import annotations

import hashlib
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router_worker.errors import ConfigError
from router_worker.events import CATEGORIES, COMPLEXITIES


class _Strict(BaseModel):
    # Unknown keys are typos until proven otherwise: reject them with their path.
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencyClass(StrEnum):
    """Coarse latency of a model; `latency_classes` maps each to expected milliseconds."""

    FAST = "fast"
    MEDIUM = "medium"
    SLOW = "slow"


class ModelSpec(_Strict):
    """One model a request can be routed to."""

    provider: str = Field(min_length=1)
    cost_per_1k_input: float = Field(ge=0)
    cost_per_1k_output: float = Field(ge=0)
    context_window: int = Field(gt=0)
    capabilities: frozenset[str] = frozenset()
    latency_class: LatencyClass = LatencyClass.MEDIUM

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """Estimated USD cost of one call."""
        return (
            input_tokens * self.cost_per_1k_input + output_tokens * self.cost_per_1k_output
        ) / 1000


class PolicySpec(_Strict):
    """An ordered preference list of models."""

    models: tuple[str, ...] = Field(min_length=1)
    description: str = ""


class TenantSpec(_Strict):
    """Per-tenant routing limits; Redis profiles override these at run time."""

    policy: str | None = None
    allowed_models: frozenset[str] | None = None
    denied_models: frozenset[str] = frozenset()
    daily_budget_usd: float | None = Field(None, ge=0)
    on_budget_exceeded: str = Field("downgrade", pattern="^(downgrade|fail)$")
    # Token bucket: sustained requests per second and the burst it may save up (None: no limit).
    requests_per_s: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)
    # Opt-in: completed events (and so routing_events.prompt) carry the prompt text, which
    # `router-worker dataset export` turns into training data. Off: hash and length only.
    store_prompts: bool = False


class Thresholds(_Strict):
    """Classifier confidence below which the keyword tier decides instead."""

    default: float = Field(0.5, ge=0, le=1)
    per_category: dict[str, float] = Field(default_factory=dict)

    def for_category(self, category: str) -> float:
        """The threshold that applies to a prediction of `category`."""
        return self.per_category.get(category, self.default)


class Estimates(_Strict):
    """Token estimates used for cost before the call happens."""

    chars_per_token: float = Field(4.0, gt=0)
    output_tokens: dict[str, int] = Field(default_factory=lambda: {"simple": 300, "complex": 1200})


class CacheSpec(_Strict):
    """Decision cache: a repeated prompt reuses its classification for `ttl_s`.

    `enabled: auto` (the default) caches while a learned engine classifies. With the keyword
    tier alone it stays off: hashing the prompt and the Redis lookup cost about as much as
    classifying it again. Measured on two cores, a miss cost ~14 us more and a hit saved
    ~4.5 us, so the cache paid only when over 3 in 4 requests repeated a prompt. `true` or
    `false` decide either way.
    """

    enabled: bool | Literal["auto"] = "auto"
    ttl_s: int = Field(3600, ge=1)

    def active(self, learned_engine: bool) -> bool:
        """Whether batches use the cache, given whether a learned engine classifies them."""
        return self.enabled is True or (self.enabled == "auto" and learned_engine)


class HealthSpec(_Strict):
    """Circuit breaker fed by outcomes: `failures` within `window_s` open it for `cooldown_s`."""

    enabled: bool = True
    failures: int = Field(5, ge=1)
    window_s: float = Field(60.0, gt=0)
    cooldown_s: float = Field(30.0, gt=0)


class PerformanceSpec(_Strict):
    """EWMA of success and latency per model; models below the bar move to the end of lists."""

    enabled: bool = True
    alpha: float = Field(0.1, gt=0, le=1)
    min_samples: int = Field(20, ge=1)
    min_success_rate: float = Field(0.8, ge=0, le=1)
    max_latency_ms: float | None = Field(None, gt=0)
    # Recovery must clear the bar by this fraction, so a model does not flap at the edge.
    hysteresis: float = Field(0.05, ge=0, lt=1)


class BudgetSpec(_Strict):
    """Spend tracking windows and the alert threshold."""

    enabled: bool = True
    alert_ratio: float = Field(0.8, gt=0, le=1)


class AffinitySpec(_Strict):
    """Session affinity: a session keeps its model for `ttl_s` while it stays eligible."""

    enabled: bool = True
    ttl_s: int = Field(3600, ge=1)


class ArmSpec(_Strict):
    """One experiment arm: a policy, or an explicit model list, and its traffic weight."""

    name: str = Field(min_length=1)
    weight: float = Field(gt=0)
    policy: str | None = None
    models: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _one_target(self) -> ArmSpec:
        if (self.policy is None) == (self.models is None):
            raise ValueError("an arm names exactly one of 'policy' or 'models'")
        return self


class ExperimentSpec(_Strict):
    """An A/B test: scope (tenants, categories) and arms with a traffic split."""

    tenants: frozenset[str] | None = None
    categories: frozenset[str] | None = None
    assign_by: str = Field("session", pattern="^(session|request)$")
    arms: tuple[ArmSpec, ...] = Field(min_length=2)
    enabled: bool = True


class RateLimitSpec(_Strict):
    """Per-tenant token buckets (the rates live on each tenant)."""

    enabled: bool = True


class RoutingConfig(_Strict):
    """The whole YAML file, validated; `version` is a hash of its content."""

    version: str = ""
    models: dict[str, ModelSpec] = Field(min_length=1)
    policies: dict[str, PolicySpec] = Field(min_length=1)
    routing: dict[str, dict[str, str]]
    fallback_policy: str
    default_category: str = "chat"
    thresholds: Thresholds = Field(default_factory=Thresholds)
    latency_classes: dict[LatencyClass, int] = Field(
        default_factory=lambda: {
            LatencyClass.FAST: 800,
            LatencyClass.MEDIUM: 3000,
            LatencyClass.SLOW: 12000,
        }
    )
    estimates: Estimates = Field(default_factory=Estimates)
    keywords: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    tenants: dict[str, TenantSpec] = Field(default_factory=lambda: {"default": TenantSpec()})
    cache: CacheSpec = Field(default_factory=CacheSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec)
    budgets: BudgetSpec = Field(default_factory=BudgetSpec)
    affinity: AffinitySpec = Field(default_factory=AffinitySpec)
    experiments: dict[str, ExperimentSpec] = Field(default_factory=dict)
    rate_limits: RateLimitSpec = Field(default_factory=RateLimitSpec)

    @cached_property
    def smallest_context_window(self) -> int:
        """The smallest context window of any model: requests below it fit every model."""
        return min(spec.context_window for spec in self.models.values())

    @model_validator(mode="after")
    def _cross_references(self) -> RoutingConfig:
        for name, policy in self.policies.items():
            for model in policy.models:
                if model not in self.models:
                    raise ValueError(f"policies.{name}.models: unknown model {model!r}")
        for category in CATEGORIES:
            row = self.routing.get(category)
            if row is None:
                raise ValueError(f"routing.{category}: missing (every category needs a row)")
            for complexity in COMPLEXITIES:
                if row.get(complexity) not in self.policies:
                    raise ValueError(
                        f"routing.{category}.{complexity}: unknown policy {row.get(complexity)!r}"
                    )
        for category in (
            list(self.routing) + list(self.keywords) + list(self.thresholds.per_category)
        ):
            if category not in CATEGORIES:
                raise ValueError(f"unknown category {category!r} (known: {', '.join(CATEGORIES)})")
        for category, phrases in self.keywords.items():
            if any(not phrase.strip() for phrase in phrases):
                raise ValueError(f"keywords.{category}: an empty phrase (it would match nothing)")
        if self.fallback_policy not in self.policies:
            raise ValueError(f"fallback_policy: unknown policy {self.fallback_policy!r}")
        if self.default_category not in CATEGORIES:
            raise ValueError(f"default_category: unknown category {self.default_category!r}")
        if "default" not in self.tenants:
            raise ValueError("tenants.default: missing (unknown tenants get this profile)")
        for tenant, spec in self.tenants.items():
            if spec.policy is not None and spec.policy not in self.policies:
                raise ValueError(f"tenants.{tenant}.policy: unknown policy {spec.policy!r}")
        for name, exp in self.experiments.items():
            for category in exp.categories or ():
                if category not in CATEGORIES:
                    raise ValueError(f"experiments.{name}.categories: unknown {category!r}")
            for arm in exp.arms:
                if arm.policy is not None and arm.policy not in self.policies:
                    raise ValueError(
                        f"experiments.{name}.arms.{arm.name}: unknown policy {arm.policy!r}")
                for model in arm.models or ():
                    if model not in self.models:
                        raise ValueError(
                            f"experiments.{name}.arms.{arm.name}: unknown model {model!r}")
            if len({a.name for a in exp.arms}) != len(exp.arms):
                raise ValueError(f"experiments.{name}.arms: names must be unique")
        return self

    def tenant(self, tenant_id: str) -> TenantSpec:
        """The configured profile of a tenant, or the default one."""
        return self.tenants.get(tenant_id) or self.tenants["default"]


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return f"invalid routing config {source}:\n" + "\n".join(lines)


def parse_config(
    raw: dict[str, Any], source: str = "<memory>", content: bytes = b""
) -> RoutingConfig:
    """Validate a config mapping; errors name the bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid routing config {source}: top level must be a mapping")
    digest = hashlib.sha256(content or repr(sorted(raw.items())).encode()).hexdigest()[:12]
    try:
        return RoutingConfig.model_validate({**raw, "version": f"cfg-{digest}"})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from exc


def load_config(path: Path) -> RoutingConfig:
    """Read and validate the YAML routing config at `path`."""
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read routing config {path}: {exc}") from exc
    try:
        raw = yaml.safe_load(content)
    except yaml.YAMLError as exc:
        raise ConfigError(f"routing config {path} is not valid YAML: {exc}") from exc
    return parse_config(raw, str(path), content)
