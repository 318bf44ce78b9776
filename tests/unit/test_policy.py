"""Policy engine: constraints, tenant limits, health, affinity and fallback ordering."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from router_worker.classify.engine import Prediction
from router_worker.config import RoutingConfig, TenantSpec, load_config
from router_worker.errors import ErrorCode, RequestRejected
from router_worker.events import RoutingRequested
from router_worker.policy import Choice, Context, DecisionMemo, candidate_order, decide
from router_worker.settings import DEFAULT_CONFIG

CONFIG = load_config(DEFAULT_CONFIG)


def _request(**fields: Any) -> RoutingRequested:
    return RoutingRequested.model_validate({"request_id": "r1", "prompt": "hello", **fields})


def _decide(
    category: str = "code", complexity: str = "complex", tenant: TenantSpec | None = None,
    unhealthy: frozenset[str] = frozenset(), session_model: str | None = None,
    config: RoutingConfig = CONFIG, **fields: Any,
) -> Choice:
    prediction = Prediction(category, complexity, 0.9)
    ctx = Context(tenant or TenantSpec(), unhealthy, session_model)
    return decide(_request(**fields), prediction, ctx, config, text_chars=400)


def test_category_and_complexity_pick_the_policy_and_its_first_model() -> None:
    choice = _decide("code", "complex")
    assert choice.policy == "code"
    assert choice.model == "claude-sonnet-4"
    assert choice.provider == "anthropic"


def test_fallbacks_follow_policy_order_then_fallback_policy() -> None:
    choice = _decide("code", "complex")
    order = candidate_order("code", CONFIG)
    assert [choice.model, *choice.fallbacks] == order[: 1 + len(choice.fallbacks)]
    assert order[:4] == list(CONFIG.policies["code"].models)


def test_alternatives_are_top_three_with_decreasing_scores() -> None:
    choice = _decide("code", "complex")
    assert len(choice.alternatives) == 3
    assert [a["model"] for a in choice.alternatives] == choice.fallbacks[:3]
    scores = [a["score"] for a in choice.alternatives]
    assert scores == sorted(scores, reverse=True)


def test_unhealthy_model_is_skipped_and_reason_says_so() -> None:
    choice = _decide("code", "complex", unhealthy=frozenset({"claude-sonnet-4"}))
    assert choice.model == "gpt-4.1"
    assert "claude-sonnet-4 (unhealthy)" in choice.reason
    assert "claude-sonnet-4" not in choice.fallbacks


def test_required_capability_filters_models() -> None:
    choice = _decide("chat", "simple", constraints={"required_capabilities": ["vision"]})
    assert "vision" in CONFIG.models[choice.model].capabilities
    assert all("vision" in CONFIG.models[m].capabilities for m in choice.fallbacks)


def test_max_cost_filters_expensive_models() -> None:
    choice = _decide("code", "complex", constraints={"max_cost_usd": 0.002})
    assert choice.estimated_cost_usd <= 0.002
    assert choice.model == "qwen2.5-coder-32b"


def test_request_allowed_and_denied_models_apply() -> None:
    choice = _decide("code", "complex", constraints={"denied_models": ["claude-sonnet-4"]})
    assert choice.model == "gpt-4.1"
    only = _decide("code", "complex", constraints={"allowed_models": ["gemini-2.5-pro"]})
    assert only.model == "gemini-2.5-pro"
    assert only.fallbacks == []


def test_tenant_limits_and_fixed_policy_apply() -> None:
    tenant = TenantSpec(policy="budget", denied_models=frozenset({"llama-3.1-8b"}))
    choice = _decide("code", "complex", tenant=tenant)
    assert choice.policy == "budget"
    assert choice.model == "gpt-4o-mini"


def test_max_latency_filters_slow_models() -> None:
    choice = _decide("math", "complex", constraints={"max_latency_ms": 5000})
    assert CONFIG.models[choice.model].latency_class.value != "slow"


def test_session_affinity_keeps_an_eligible_model_first() -> None:
    choice = _decide("code", "complex", session_model="gpt-4.1")
    assert choice.model == "gpt-4.1"
    assert "session affinity" in choice.reason


def test_session_affinity_yields_when_pinned_model_is_unhealthy() -> None:
    choice = _decide("code", "complex", session_model="gpt-4.1",
                     unhealthy=frozenset({"gpt-4.1"}))
    assert choice.model == "claude-sonnet-4"


def test_no_eligible_model_is_rejected_with_stable_code() -> None:
    with pytest.raises(RequestRejected) as caught:
        _decide(constraints={"required_capabilities": ["teleportation"]})
    assert caught.value.error_code is ErrorCode.NO_ELIGIBLE_MODEL
    assert "lacks teleportation" in caught.value.detail


def test_huge_prompt_skips_small_context_models() -> None:
    prediction = Prediction("code", "simple", 0.9)
    choice = decide(_request(), prediction, Context(TenantSpec()), CONFIG, text_chars=200_000)
    assert CONFIG.models[choice.model].context_window >= 50_000


def _outcome(request: RoutingRequested, prediction: Prediction, ctx: Context, chars: int,
             memo: DecisionMemo | None) -> Choice | str:
    try:
        return decide(request, prediction, ctx, CONFIG, chars, memo)
    except RequestRejected as exc:
        return exc.detail


def test_a_batch_memo_gives_the_same_decisions_as_deciding_each_request_alone() -> None:
    rng = random.Random(5)
    models = sorted(CONFIG.models)
    tenants = [TenantSpec(), TenantSpec(denied_models=frozenset({models[0]})),
               TenantSpec(policy=next(iter(CONFIG.policies)))]
    constraints: list[dict[str, Any]] = [
        {}, {"max_cost_usd": 0.0005}, {"required_capabilities": ["vision"]},
        {"denied_models": [models[1]]}, {"max_latency_ms": 5000},
    ]
    memo: DecisionMemo = {}
    cases = itertools.product(["code", "chat", "math"], ["simple", "complex"], range(40))
    for category, complexity, _ in cases:
        ctx = Context(
            rng.choice(tenants),
            unhealthy=frozenset(rng.sample(models, rng.choice([0, 0, 1, 2]))),
            session_model=rng.choice([None, None, *models]),
            demoted=frozenset(rng.sample(models, rng.choice([0, 0, 1]))),
            downgrade=rng.random() < 0.2,
        )
        request = _request(constraints=rng.choice(constraints))
        # repeated confidences too: a ranking keeps the scored alternatives of each
        prediction = Prediction(category, complexity, rng.choice([0.55, 0.7, rng.random()]))
        chars = rng.choice([40, 400, 4000, 200_000])
        assert _outcome(request, prediction, ctx, chars, memo) == _outcome(
            request, prediction, ctx, chars, None)
    assert memo  # the plain requests did share rankings
