"""Policy engine: constraints, tenant limits, health, affinity and fallback ordering."""

from __future__ import annotations

from typing import Any

import pytest

from router_worker.classify.engine import Prediction
from router_worker.config import RoutingConfig, TenantSpec, load_config
from router_worker.errors import ErrorCode, RequestRejected
from router_worker.events import RoutingRequested
from router_worker.policy import Choice, Context, candidate_order, decide
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
    assert [m for m, _ in choice.alternatives] == choice.fallbacks[:3]
    scores = [s for _, s in choice.alternatives]
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
