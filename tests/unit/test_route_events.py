"""The events a routed batch produces match their contracts, whatever the router shares."""

from __future__ import annotations

import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router_worker.agents.route import Router
from router_worker.classify.cascade import Cascade
from router_worker.classify.keyword import keyword_engine_from_config
from router_worker.config import load_config
from router_worker.events import RoutingCompleted, round_half_up
from router_worker.metrics import create_metrics
from router_worker.settings import Settings
from router_worker.validate import Inbound

PROMPTS = ["Write a Python function that merges two sorted lists.", "hi there",
           "kubectl shows CrashLoopBackOff for my pod", "What is the derivative of x^3?"]


def _router() -> Router:
    settings = Settings(engine="keyword")
    config = load_config(settings.config)
    cascade = Cascade(None, keyword_engine_from_config(config), config.thresholds)
    return Router(settings, config, cascade, None, create_metrics())


async def test_completed_events_of_a_batch_validate_and_share_their_decision_time() -> None:
    sent_ms = time.time() * 1000
    batch = [Inbound(orjson.dumps({"request_id": f"r{i}", "prompt": PROMPTS[i % 4]}),
                     f"r{i}".encode(), (), "t", 0, i, sent_ms) for i in range(12)]
    out = await _router().route(batch)
    assert [o.status for o in out] == ["completed"] * 12
    raws = [orjson.loads(o.value) for o in out]
    events = [RoutingCompleted.model_validate_json(o.value) for o in out]
    assert len({raw["decided_at"] for raw in raws}) == 1  # one time for the batch
    for raw, event, outgoing in zip(raws, events, out, strict=True):
        # the pre-formatted time is what orjson writes for the datetime itself
        assert orjson.dumps(event.decided_at).decode().strip('"') == raw["decided_at"]
        assert event.decided_at.utcoffset() is not None
        timings = event.timings_ms
        assert timings.total == pytest.approx(
            timings.queue + timings.enrich + timings.classify, abs=0.0015)
        assert event.decision.fallbacks[:len(event.decision.alternatives)] == [
            a.model for a in event.decision.alternatives]
        assert outgoing.labels == (event.decision.tier.value, event.decision.model,
                                   event.decision.category.value, event.decision.policy)
        assert outgoing.headers == [("correlation_id", event.request_id.encode())]


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_durations_round_to_the_microsecond_as_round_does_away_from_halves(ms: float) -> None:
    fraction = (ms * 1000) % 1
    if abs(fraction - 0.5) > 1e-6:  # at a half, round() goes by the exact binary value
        assert round_half_up(ms, 1e3) == round(ms, 3)


@given(st.floats(min_value=0, max_value=10, allow_nan=False))
def test_costs_round_to_8_decimals_as_round_does_away_from_halves(usd: float) -> None:
    fraction = (usd * 1e8) % 1
    if abs(fraction - 0.5) > 1e-6:
        assert round_half_up(usd, 1e8) == round(usd, 8)
