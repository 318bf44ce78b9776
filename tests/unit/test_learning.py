"""Pure logic of the learned state: cache keys, breaker, EWMA/demotion, budgets, experiments,
token buckets, and how the policy uses them."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from router_worker.classify.engine import Prediction
from router_worker.config import (
    ExperimentSpec,
    HealthSpec,
    PerformanceSpec,
    TenantSpec,
    load_config,
    parse_config,
)
from router_worker.errors import ConfigError
from router_worker.events import RoutingRequested, Tier
from router_worker.policy import Context, decide
from router_worker.settings import DEFAULT_CONFIG
from router_worker.state.budget import BudgetLevel, budget_status, window_ids
from router_worker.state.cache import cache_key, decode_prediction, encode_prediction, normalise
from router_worker.state.experiments import assign, choose
from router_worker.state.health import BreakerState, Transition, open_value, state_of, transition
from router_worker.state.perf import PerfStats, demotion, ewma
from router_worker.state.ratelimit import bucket_size, take

CONFIG = load_config(DEFAULT_CONFIG)
HEALTH = HealthSpec(failures=5, window_s=60, cooldown_s=30)


# --- cache -------------------------------------------------------------------------------------

def test_cache_key_ignores_case_unicode_form_and_whitespace() -> None:
    assert normalise("  Hello\tWORLD \n") == "hello world"
    assert cache_key("t", "v1", "Hello  world") == cache_key("t", "v1", "hello world\n")
    fullwidth = "\uff48\uff45\uff4c\uff4c\uff4f"
    assert cache_key("t", "v1", fullwidth) == cache_key("t", "v1", "hello")  # NFKC


def test_cache_key_changes_with_tenant_version_and_prompt() -> None:
    base = cache_key("t", "v1", "hello")
    assert len(base) == 32
    assert len({base, cache_key("u", "v1", "hello"), cache_key("t", "v2", "hello"),
                cache_key("t", "v1", "hello!")}) == 4


def test_cached_prediction_round_trips_with_cache_tier() -> None:
    decoded = decode_prediction(encode_prediction(Prediction("code", "complex", 0.87654)))
    assert decoded is not None
    assert (decoded.category, decoded.complexity, decoded.tier) == ("code", "complex", Tier.CACHE)
    assert decoded.confidence == pytest.approx(0.8765)
    assert decode_prediction(b"garbage") is None
    assert decode_prediction(b"poetry|simple|0.5|1") is None
    assert decode_prediction(None) is None


# --- circuit breaker ---------------------------------------------------------------------------

def test_breaker_opens_at_the_failure_threshold_within_the_window() -> None:
    assert transition(None, 4, 0, 4, 100.0, HEALTH) is Transition.KEEP
    assert transition(None, 5, 0, 1, 100.0, HEALTH) is Transition.OPEN


def test_open_breaker_ignores_outcomes_until_cooldown_then_half_opens() -> None:
    value = open_value(100.0, HEALTH)
    assert state_of(value, 110.0) is BreakerState.OPEN
    assert transition(value, 9, 3, 9, 110.0, HEALTH) is Transition.KEEP
    assert state_of(value, 130.0) is BreakerState.HALF_OPEN


def test_half_open_probe_success_closes_and_failure_reopens() -> None:
    value = open_value(100.0, HEALTH)
    assert transition(value, 0, 1, 0, 131.0, HEALTH) is Transition.CLOSE
    assert transition(value, 1, 0, 1, 131.0, HEALTH) is Transition.OPEN
    assert transition(value, 0, 0, 0, 131.0, HEALTH) is Transition.KEEP


def test_forced_down_is_never_closed_by_outcomes() -> None:
    assert state_of("down", 0.0) is BreakerState.DOWN
    assert transition("down", 0, 10, 0, 0.0, HEALTH) is Transition.KEEP


# --- performance -------------------------------------------------------------------------------

def test_ewma_of_a_batch_equals_folding_its_equal_samples_one_by_one() -> None:
    one_by_one = 1.0
    for _ in range(5):
        one_by_one = ewma(one_by_one, 0.0, 1, 0.1)
    assert ewma(1.0, 0.0, 5, 0.1) == pytest.approx(one_by_one)
    assert ewma(None, 0.7, 3, 0.1) == 0.7


def test_demotion_needs_samples_and_recovery_needs_the_hysteresis_margin() -> None:
    spec = PerformanceSpec(min_samples=10, min_success_rate=0.8, hysteresis=0.05,
                           max_latency_ms=2000)
    assert demotion(PerfStats(5, 0.1, 100), False, spec) is None  # too few samples
    assert demotion(PerfStats(50, 0.7, 100), False, spec) is not None
    assert demotion(PerfStats(50, 0.82, 100), True, spec) is not None  # not yet recovered
    assert demotion(PerfStats(50, 0.9, 100), True, spec) is None
    assert "latency" in (demotion(PerfStats(50, 0.99, 2500), False, spec) or "")


# --- budgets -----------------------------------------------------------------------------------

def test_budget_windows_are_day_iso_week_and_month() -> None:
    ids = window_ids(datetime(2025, 1, 1, 12, tzinfo=UTC))
    assert ids == {"daily": "d20250101", "weekly": "w2025-01", "monthly": "m202501"}


def test_budget_levels_warn_at_the_alert_ratio_and_exceed_at_the_budget() -> None:
    assert budget_status(1.0, None, 0.8) is None
    assert budget_status(3.0, 10.0, 0.8).level is BudgetLevel.OK  # type: ignore[union-attr]
    assert budget_status(8.0, 10.0, 0.8).level is BudgetLevel.WARNING  # type: ignore[union-attr]
    assert budget_status(10.0, 10.0, 0.8).level is BudgetLevel.EXCEEDED  # type: ignore[union-attr]
    assert budget_status(0.0, 0.0, 0.8).level is BudgetLevel.EXCEEDED  # type: ignore[union-attr]


# --- experiments -------------------------------------------------------------------------------

def _experiment(**fields: Any) -> ExperimentSpec:
    arms = [{"name": "a", "weight": 70, "policy": "code"},
            {"name": "b", "weight": 30, "models": ["claude-haiku-3.5"]}]
    return ExperimentSpec.model_validate({"arms": arms, **fields})


def test_experiment_split_is_within_three_points_of_the_weights_over_10k_units() -> None:
    spec = _experiment()
    counts = Counter(assign("exp", spec, f"user-{i}").name for i in range(10_000))
    assert abs(counts["a"] / 10_000 - 0.7) < 0.03
    assert abs(counts["b"] / 10_000 - 0.3) < 0.03


def test_experiment_assignment_is_deterministic_by_session_and_scoped() -> None:
    raw = CONFIG.model_dump(mode="json", exclude={"version"})
    raw["experiments"] = {"exp": _experiment(categories=["code"]).model_dump(mode="json")}
    config = parse_config(raw)
    first = choose(config, "t", "code", "r1", "s1")
    assert first is not None
    assert all(choose(config, "t", "code", f"r{i}", "s1") == first for i in range(20))
    assert choose(config, "t", "chat", "r1", "s1") is None


def test_experiment_arms_must_name_known_policies_and_models() -> None:
    raw = CONFIG.model_dump(mode="json", exclude={"version"})
    raw["experiments"] = {"exp": {"arms": [{"name": "a", "weight": 1, "policy": "nope"},
                                           {"name": "b", "weight": 1, "models": ["o3"]}]}}
    with pytest.raises(ConfigError, match="unknown policy 'nope'"):
        parse_config(raw)


# --- token bucket ------------------------------------------------------------------------------

def test_token_bucket_grants_the_burst_then_refills_at_the_rate() -> None:
    granted, tokens, ts = take(None, None, 0.0, rate=2.0, burst=5, n=8)
    assert (granted, tokens) == (5, 0.0)
    granted, tokens, ts = take(tokens, ts, 1000.0, rate=2.0, burst=5, n=8)
    assert granted == 2
    granted, tokens, _ = take(tokens, ts, 60_000.0, rate=2.0, burst=5, n=1)
    assert (granted, tokens) == (1, 4.0)  # refill is capped at the burst


def test_bucket_size_defaults_burst_to_one_second_of_rate() -> None:
    assert bucket_size(TenantSpec()) is None
    assert bucket_size(TenantSpec(requests_per_s=2.5)) == (2.5, 3)
    assert bucket_size(TenantSpec(requests_per_s=2.5, burst=10)) == (2.5, 10)


# --- policy use --------------------------------------------------------------------------------

def _choose(**ctx: Any) -> Any:
    request = RoutingRequested.model_validate({"request_id": "r", "prompt": "x"})
    return decide(request, Prediction("code", "complex", 0.9), Context(TenantSpec(), **ctx),
                  CONFIG, text_chars=400)


def test_demoted_model_moves_behind_the_healthy_ones_and_the_reason_says_so() -> None:
    choice = _choose(demoted=frozenset({"claude-sonnet-4"}))
    assert choice.model == "gpt-4.1"
    assert "claude-sonnet-4" not in choice.fallbacks[:3]  # tried last, not dropped
    assert "demoted claude-sonnet-4" in choice.reason
    assert choice.preferred == "claude-sonnet-4"


def test_budget_downgrade_puts_the_cheapest_eligible_model_first() -> None:
    choice = _choose(downgrade=True)
    costs = {m: CONFIG.models[m].cost(101, 1200) for m in [choice.model, *choice.fallbacks]}
    assert choice.model == min(costs, key=costs.__getitem__)
    assert "budget exceeded" in choice.reason


def test_experiment_arm_overrides_the_policy_and_its_models() -> None:
    choice = _choose(policy_override="experiment:exp/b", models_override=("claude-haiku-3.5",))
    assert (choice.model, choice.policy) == ("claude-haiku-3.5", "experiment:exp/b")
