"""Stage 4: category x complexity -> policy -> eligible models -> one decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from router_worker.classify.engine import Prediction
from router_worker.config import ModelSpec, RoutingConfig, TenantSpec
from router_worker.errors import ErrorCode, RequestRejected
from router_worker.events import NO_CONSTRAINTS, Constraints, RoutingRequested, round_half_up
from router_worker.frozen import frozen

MAX_FALLBACKS = 4
TOP_ALTERNATIVES = 3
# Distinct confidences whose scored alternatives a ranking keeps (the keyword tier has a few
# dozen; a learned engine's are continuous and mostly miss).
_SCORED_MAX = 64


@frozen
class Context:
    """Everything besides the request that a decision depends on."""

    tenant: TenantSpec
    unhealthy: frozenset[str] = frozenset()
    session_model: str | None = None
    # models whose tracked performance is below the bar: tried after every other eligible one
    demoted: frozenset[str] = frozenset()
    # the tenant's budget is spent and it downgrades: cheapest eligible models first
    downgrade: bool = False
    # an experiment arm replaces the policy: its name and, for a model-list arm, the models
    policy_override: str | None = None
    models_override: tuple[str, ...] | None = None


def _exclusion(
    name: str, spec: ModelSpec, constraints: Constraints, ctx: Context, config: RoutingConfig,
    input_tokens: int, output_tokens: int,
) -> str | None:
    """Why `name` cannot serve this request, or None when it can."""
    tenant = ctx.tenant
    if tenant.allowed_models is not None and name not in tenant.allowed_models:
        return "not allowed for tenant"
    if name in tenant.denied_models:
        return "denied for tenant"
    if constraints.allowed_models is not None and name not in constraints.allowed_models:
        return "not in allowed_models"
    if name in constraints.denied_models:
        return "in denied_models"
    missing = set(constraints.required_capabilities) - spec.capabilities
    if missing:
        return f"lacks {','.join(sorted(missing))}"
    if input_tokens + output_tokens > spec.context_window:
        return "context window too small"
    if constraints.max_cost_usd is not None and spec.cost(input_tokens, output_tokens) > (
        constraints.max_cost_usd
    ):
        return "over max_cost_usd"
    if constraints.max_latency_ms is not None and config.latency_classes[spec.latency_class] > (
        constraints.max_latency_ms
    ):
        return "too slow for max_latency_ms"
    if name in ctx.unhealthy:
        return "unhealthy"
    return None


def choose_policy(category: str, complexity: str, tenant: TenantSpec, config: RoutingConfig) -> str:
    """The tenant's fixed policy, else the routing table's cell."""
    return tenant.policy or config.routing[category][complexity]


def candidate_order(
    policy: str, config: RoutingConfig, models: tuple[str, ...] | None = None
) -> list[str]:
    """The policy's (or an experiment arm's) models, then the fallback policy's, no repeats."""
    order = list(models if models is not None else config.policies[policy].models)
    order += [m for m in config.policies[config.fallback_policy].models if m not in order]
    return order


class Alternative(TypedDict):
    """A runner-up model and its score."""

    model: str
    score: float


@frozen
class Choice:
    """The policy engine's answer before it is wrapped in an event."""

    model: str
    provider: str
    policy: str
    # fallbacks, alternatives and skipped may be shared with other decisions: read-only
    fallbacks: list[str]
    alternatives: list[Alternative]  # {"model", "score"}: the completed event's shape
    reason: str
    estimated_cost_usd: float
    skipped: list[tuple[str, str]]
    # the policy's first model; differs from `model` when it was skipped or demoted
    preferred: str = ""


@dataclass(frozen=True, slots=True, eq=False)
class _Ranking:
    """The token-independent part of a decision: which models, in what order, and why.

    Shared by every request of a batch with the same memo key, so its lists are read-only.
    """

    order: tuple[str, ...]
    eligible: tuple[str, ...]
    skipped: list[tuple[str, str]]
    reason: str
    spec: ModelSpec  # the chosen model's
    fallbacks: list[str]
    # (model, share of the classifier's confidence) of the runners-up
    weights: tuple[tuple[str, float], ...]
    # scored alternatives per confidence: a batch's predictions share few confidence values
    scored: dict[float, list[Alternative]] = field(default_factory=dict)

    def alternatives(self, confidence: float) -> list[Alternative]:
        """The runners-up with scores: the policy's preference order, scaled by how sure the
        classifier was."""
        found = self.scored.get(confidence)
        if found is None:
            found = [{"model": name, "score": round(confidence * weight, 4)}
                     for name, weight in self.weights]
            if len(self.scored) < _SCORED_MAX:
                self.scored[confidence] = found
        return found


# Per-batch memo of rankings: requests of one batch share tenant, health and demotions, so
# the same (category, complexity, policy) ranks the same models again.
DecisionMemo = dict[tuple[object, ...], _Ranking]


def _plain(constraints: Constraints) -> bool:
    """No caller constraints: the ranking cannot depend on anything the memo key leaves out."""
    return (constraints.max_cost_usd is None and constraints.max_latency_ms is None
            and not constraints.required_capabilities and constraints.allowed_models is None
            and not constraints.denied_models)


def _rank(
    request: RoutingRequested, prediction: Prediction, ctx: Context, config: RoutingConfig,
    policy: str, input_tokens: int, output_tokens: int,
) -> _Ranking:
    category = prediction.category
    order = candidate_order(policy if policy in config.policies else config.fallback_policy,
                            config, ctx.models_override)
    eligible: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name in order:
        why = _exclusion(name, config.models[name], request.constraints, ctx, config,
                         input_tokens, output_tokens)
        if why is None:
            eligible.append(name)
        else:
            skipped.append((name, why))
    if not eligible:
        detail = "; ".join(f"{m}: {why}" for m, why in skipped)
        raise RequestRejected(ErrorCode.NO_ELIGIBLE_MODEL, f"policy {policy}: {detail}")
    notes: list[str] = []
    demoted = [m for m in eligible if m in ctx.demoted]
    if demoted and len(demoted) < len(eligible):
        eligible = [m for m in eligible if m not in ctx.demoted] + demoted
        notes.append(f"demoted {', '.join(demoted)}")
    if ctx.downgrade:
        eligible.sort(key=lambda m: config.models[m].cost(input_tokens, output_tokens))
        notes.append("budget exceeded: cheapest eligible first")
    pinned = ctx.session_model in eligible and not ctx.downgrade
    if pinned and ctx.session_model is not None:
        eligible.remove(ctx.session_model)
        eligible.insert(0, ctx.session_model)
    reason = (f"{category}/{prediction.complexity} -> policy {policy}; "
              + ("session affinity; " if pinned else "")
              + "".join(f"{note}; " for note in notes)
              + (f"skipped {', '.join(f'{m} ({w})' for m, w in skipped)}" if skipped
                 else "first choice eligible"))
    slots = len(order) + 1
    weights = tuple((name, 1.0 - (rank + 1) / slots)
                    for rank, name in enumerate(eligible[1:1 + TOP_ALTERNATIVES]))
    return _Ranking(tuple(order), tuple(eligible), skipped, reason, config.models[eligible[0]],
                    eligible[1:1 + MAX_FALLBACKS], weights)


def decide(
    request: RoutingRequested, prediction: Prediction, ctx: Context, config: RoutingConfig,
    text_chars: int, memo: DecisionMemo | None = None,
) -> Choice:
    """Pick the model and fallback chain; raises RequestRejected(no_eligible_model).

    With a `memo` (one per micro-batch), requests without constraints reuse the ranking of an
    earlier request with the same key; only the scores and the cost estimate are per request.
    """
    policy = ctx.policy_override or choose_policy(
        prediction.category, prediction.complexity, ctx.tenant, config)
    input_tokens = int(text_chars / config.estimates.chars_per_token) + 1
    output_tokens = config.estimates.output_tokens.get(prediction.complexity, 500)
    key: tuple[object, ...] | None = None
    ranking: _Ranking | None = None
    # Tokens only matter through context windows (constraints are off): below the smallest
    # window every request of a key ranks alike. A downgrade sorts by cost, so never memoised.
    if (memo is not None and not ctx.downgrade
            and (request.constraints is NO_CONSTRAINTS or _plain(request.constraints))
            and input_tokens + output_tokens <= config.smallest_context_window):
        key = (prediction.category, prediction.complexity, policy, ctx.models_override,
               ctx.tenant, ctx.unhealthy, ctx.demoted, ctx.session_model)
        ranking = memo.get(key)
    if ranking is None:
        ranking = _rank(request, prediction, ctx, config, policy, input_tokens, output_tokens)
        if key is not None and memo is not None:
            memo[key] = ranking
    spec = ranking.spec
    # The lists are the ranking's, shared by the requests of a batch that rank alike.
    return Choice(
        model=ranking.eligible[0], provider=spec.provider, policy=policy,
        fallbacks=ranking.fallbacks, alternatives=ranking.alternatives(prediction.confidence),
        reason=ranking.reason,
        estimated_cost_usd=round_half_up(spec.cost(input_tokens, output_tokens), 1e8),
        skipped=ranking.skipped, preferred=ranking.order[0],
    )
