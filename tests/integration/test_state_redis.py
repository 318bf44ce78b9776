"""The learned state on a real Redis: one round trip per batch, Lua agreeing with Python,
and the outcome recorder's breaker, performance, spend, experiment and alert updates."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from router_worker.agents.outcome import OutcomeRecorder
from router_worker.agents.route import Router
from router_worker.classify.cascade import Cascade
from router_worker.classify.keyword import keyword_engine_from_config
from router_worker.config import RoutingConfig
from router_worker.enrich import WRITE_BACK_DELAY_S, Enricher, Keys
from router_worker.events import RoutingRequested
from router_worker.metrics import create_metrics
from router_worker.redis_wire import with_fast_packing
from router_worker.state.health import open_value
from router_worker.state.perf import PERF_SCRIPT, ewma
from router_worker.state.ratelimit import BUCKET_SCRIPT, take
from router_worker.validate import Inbound
from tests.conftest import settings_from
from tests.integration.configs import config_with

pytestmark = pytest.mark.integration


class RoundTrips:
    """Counts pipelines executed and commands sent outside a pipeline."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pipelines = 0
        self.direct = 0
        original_execute = Pipeline.execute
        original_command = aioredis.Redis.execute_command

        async def execute(pipe: Pipeline, *args: Any, **kwargs: Any) -> Any:
            self.pipelines += 1
            return await original_execute(pipe, *args, **kwargs)

        async def command(client: aioredis.Redis, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(client, Pipeline):
                self.direct += 1
            return await original_command(client, *args, **kwargs)

        monkeypatch.setattr(Pipeline, "execute", execute)
        monkeypatch.setattr(aioredis.Redis, "execute_command", command)

    def reset(self) -> None:
        self.pipelines = self.direct = 0


@pytest.fixture
async def redis_client(isolated: dict[str, str]) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings_from(isolated).redis_url.get_secret_value())
    yield client
    await client.aclose()


def _inbound(body: dict[str, Any], offset: int) -> Inbound:
    return Inbound(orjson.dumps(body), str(body["request_id"]).encode(), (), "t", 0, offset,
                   time.time() * 1000)


def _router(
    env: dict[str, str], config: RoutingConfig, overlap_max: int | None = None
) -> tuple[Router, Enricher]:
    if overlap_max is not None:
        env = {**env, "ROUTER_CLASSIFY_OVERLAP_MAX": str(overlap_max)}
    settings = settings_from(env)
    enricher = Enricher(settings.redis_url.get_secret_value(), settings.redis_prefix, config)
    cascade = Cascade(None, keyword_engine_from_config(config), config.thresholds,
                      inline_max=settings.classify_inline_max)
    return Router(settings, config, cascade, enricher, create_metrics()), enricher


# 64: the batch below (41) is classified while its round trip is in flight; 0: after it
@pytest.mark.parametrize("overlap_max", [64, 0])
async def test_a_batch_with_every_feature_costs_one_round_trip_its_writes_ride_the_next(
    isolated: dict[str, str], tmp_path: Path, redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch, overlap_max: int,
) -> None:
    config = config_with(tmp_path, cache={"enabled": True})  # on for the keyword tier too
    router, enricher = _router(isolated, config, overlap_max)
    keys = Keys(settings_from(isolated).redis_prefix)
    now = time.time()
    await redis_client.hset(keys.health(), mapping={
        "o3": open_value(now - 100, config.health),  # cooldown over: half-open
        "gpt-4.1": open_value(now, config.health)})
    await redis_client.hset(keys.demoted(), "claude-sonnet-4", "success 0.10 < 0.80")
    tenants = ["default", "spendy", "limited", "lab"]
    batch = [_inbound({"request_id": f"r{i}", "tenant_id": tenants[i % 4],
                       "session_id": f"s{i % 7}", "prompt": f"Write a python function {i % 5}"},
                      i) for i in range(40)]
    batch.append(Inbound(b"{bad", b"bad", (), "t", 0, 99, 0.0))
    counter = RoundTrips(monkeypatch)
    try:
        first = await router.route(batch)
        assert (counter.pipelines, counter.direct) == (1, 0)  # the reads; its writes wait
        counter.reset()
        second = await router.route(batch)  # the first batch's writes, then this one's reads
        assert (counter.pipelines, counter.direct) == (1, 0)
        counter.reset()
        await enricher.flush()  # the second batch's writes
        assert (counter.pipelines, counter.direct) == (1, 0)
    finally:
        await enricher.stop()
    assert len(first) == len(second) == 41
    tiers = [orjson.loads(o.value)["decision"]["tier"] for o in second if o.status == "completed"]
    assert len(tiers) == 40 - 10  # all but `limited`'s requests
    assert set(tiers) == {"cache"}, tiers
    limited = [o for o in first + second if o.labels == ("rate_limited",)]
    assert len(limited) == 20 - 3  # 10 requests of `limited` per batch, burst 3


async def test_half_open_probe_lets_exactly_one_request_through_across_workers(
    isolated: dict[str, str], tmp_path: Path, redis_client: aioredis.Redis,
) -> None:
    config = config_with(tmp_path)
    settings = settings_from(isolated)
    keys = Keys(settings.redis_prefix)
    await redis_client.hset(keys.health(), "gpt-4o-mini", open_value(time.time() - 100,
                                                                     config.health))
    requests = [RoutingRequested(request_id="r", prompt="hi")]
    enrichers = [Enricher(settings.redis_url.get_secret_value(), settings.redis_prefix, config)
                 for _ in range(3)]
    try:
        results = [await e.enrich(requests) for e in enrichers]
    finally:
        for e in enrichers:
            await e.stop()
    assert sum("gpt-4o-mini" in r.probes for r in results) == 1
    assert sum("gpt-4o-mini" in r.unhealthy for r in results) == 2


async def test_lua_token_bucket_and_ewma_agree_with_the_python_model(
    isolated: dict[str, str], redis_client: aioredis.Redis,
) -> None:
    keys = Keys(settings_from(isolated).redis_prefix)
    state: tuple[float | None, float | None] = (None, None)
    for now_ms, n in [(1_000, 8), (1_500, 3), (4_000, 10), (4_000, 1)]:
        granted_lua = await redis_client.eval(BUCKET_SCRIPT, 1, keys.bucket("x"), 2.0, 5,
                                              now_ms, n)  # type: ignore[misc]
        granted, tokens, ts = take(state[0], state[1], now_ms, 2.0, 5, n)
        state = (tokens, ts)
        assert granted_lua == granted
    reply = await redis_client.eval(PERF_SCRIPT, 1, keys.perf(), 0.1, "m", 4, 0.5, 200.0,
                                    )  # type: ignore[misc]
    reply = await redis_client.eval(PERF_SCRIPT, 1, keys.perf(), 0.1, "m", 3, 1.0, 100.0,
                                    )  # type: ignore[misc]
    assert int(reply[0]) == 7
    assert float(reply[1]) == pytest.approx(ewma(0.5, 1.0, 3, 0.1))
    assert float(reply[2]) == pytest.approx(ewma(200.0, 100.0, 3, 0.1))


def _outcome(rid: str, model: str, success: bool, **fields: Any) -> Inbound:
    body = {"request_id": rid, "model": model, "success": success, "latency_ms": 100.0, **fields}
    return _inbound(body, 0)


async def test_outcomes_open_the_breaker_track_spend_and_alert_once_per_window(
    isolated: dict[str, str], tmp_path: Path, redis_client: aioredis.Redis,
) -> None:
    config = config_with(tmp_path)
    settings = settings_from(isolated)
    keys = Keys(settings.redis_prefix)
    recorder = OutcomeRecorder(settings, config, create_metrics())
    try:
        failures = [_outcome(f"f{i}", "o3", False) for i in range(4)]
        assert await recorder.record(failures + failures) == []  # redelivery counts once
        assert await redis_client.hget(keys.health(), "o3") is None
        await recorder.record([_outcome("f9", "o3", False)])
        assert (await redis_client.hget(keys.health(), "o3") or b"").startswith(b"open:")

        alerts = await recorder.record([_outcome("c1", "gpt-4.1", True, tenant_id="spendy",
                                                 cost_usd=0.85, policy="normal")])
        assert [orjson.loads(a.value)["kind"] for a in alerts] == ["budget_warning"]
        again = await recorder.record([_outcome("c2", "gpt-4.1", True, tenant_id="spendy",
                                                cost_usd=0.01)])
        assert again == []  # once per window
        over = await recorder.record([_outcome("c3", "gpt-4.1", True, tenant_id="spendy",
                                               cost_usd=0.5)])
        assert [orjson.loads(a.value)["kind"] for a in over] == ["budget_exceeded"]
        spend_keys = [k async for k in redis_client.scan_iter(match=f"{keys.prefix}spend:*")]
        kinds = {k.decode().removeprefix(keys.prefix).split(":")[1] for k in spend_keys}
        assert kinds == {"t", "m", "p"}
        assert len(spend_keys) == 9  # tenant, model, policy x day, week, month
    finally:
        await recorder.stop()


async def test_bad_performance_demotes_and_recovery_promotes(
    isolated: dict[str, str], tmp_path: Path, redis_client: aioredis.Redis,
) -> None:
    config = config_with(tmp_path, performance={"min_samples": 5, "min_success_rate": 0.8,
                                                "alpha": 0.3})
    settings = settings_from(isolated)
    keys = Keys(settings.redis_prefix)
    recorder = OutcomeRecorder(settings, config, create_metrics())
    try:
        # successes and failures interleaved, so the breaker stays closed (4 < 5 in the window)
        await recorder.record([_outcome(f"a{i}", "gemini-2.5-flash", i % 2 == 0,
                                        category="chat") for i in range(8)])
        demoted = await redis_client.hgetall(keys.demoted())
        assert b"gemini-2.5-flash" in demoted
        assert b"gemini-2.5-flash@chat" in demoted
        await recorder.record([_outcome(f"b{i}", "gemini-2.5-flash", True) for i in range(20)])
        demoted = await redis_client.hgetall(keys.demoted())
        assert b"gemini-2.5-flash" not in demoted
    finally:
        await recorder.stop()


async def test_write_back_runs_behind_the_decisions_but_before_the_next_enrich(
    isolated: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = config_with(tmp_path)
    router, enricher = _router(isolated, config)
    pin = _inbound({"request_id": "p1", "session_id": "s-pin", "prompt": "integrate x^2"}, 0)
    again = _inbound({"request_id": "p2", "session_id": "s-pin", "prompt": "hello there"}, 1)
    counter = RoundTrips(monkeypatch)
    try:
        [first] = await router.route([pin])
        assert counter.pipelines == 1  # the route returned after the enrich alone
        [second] = await router.route([again])  # the pin is written ahead of its reads
        assert counter.pipelines == 2
    finally:
        await enricher.stop()
    model = orjson.loads(first.value)["decision"]["model"]
    assert orjson.loads(second.value)["decision"]["model"] == model
    assert "session affinity" in orjson.loads(second.value)["decision"]["reason"]


async def test_batches_routed_together_after_a_pin_both_see_it(
    isolated: dict[str, str], tmp_path: Path,
) -> None:
    config = config_with(tmp_path)
    router, enricher = _router(isolated, config)
    pin = _inbound({"request_id": "p1", "session_id": "s-pin", "prompt": "integrate x^2"}, 0)
    later = [_inbound({"request_id": f"p{i}", "session_id": "s-pin", "prompt": "hello there"}, i)
             for i in (2, 3)]
    try:
        [first] = await router.route([pin])
        # The first of these carries the pin; the second reads only after it has landed.
        routed = await asyncio.gather(*(router.route([one]) for one in later))
    finally:
        await enricher.stop()
    model = orjson.loads(first.value)["decision"]["model"]
    for [out] in routed:
        decision = orjson.loads(out.value)["decision"]
        assert decision["model"] == model
        assert "session affinity" in decision["reason"]


async def test_writes_go_on_their_own_when_no_batch_follows(
    isolated: dict[str, str], tmp_path: Path, redis_client: aioredis.Redis,
) -> None:
    config = config_with(tmp_path)
    router, enricher = _router(isolated, config)
    keys = Keys(settings_from(isolated).redis_prefix)
    pin = _inbound({"request_id": "p1", "session_id": "s-alone", "prompt": "integrate x^2"}, 0)
    try:
        await router.route([pin])
        assert await redis_client.get(keys.session("default", "s-alone")) is None  # queued
        await asyncio.sleep(WRITE_BACK_DELAY_S * 10)
        assert await redis_client.get(keys.session("default", "s-alone")) is not None
    finally:
        await enricher.stop()


async def test_the_enrichers_faster_packing_round_trips_through_redis(
    isolated: dict[str, str], redis_client: aioredis.Redis,
) -> None:
    settings = settings_from(isolated)
    client = with_fast_packing(aioredis.Redis.from_url(settings.redis_url.get_secret_value()))
    keys = [f"{settings.redis_prefix}wire:{i}" for i in range(300)]
    try:
        async with client.pipeline(transaction=False) as pipe:
            for i, key in enumerate(keys):
                pipe.set(key, f"value-\u00e9-{i}".encode(), ex=60)
            await pipe.execute()
        expected = [f"value-\u00e9-{i}".encode() for i in range(300)]
        assert await client.mget(keys) == expected
        assert await redis_client.mget(keys) == expected  # a plain redis-py client agrees
        assert await client.eval("return #KEYS + #ARGV", 2, keys[0], keys[1], 7, b"x") == 4
    finally:
        await client.aclose()


async def test_the_keyword_tier_alone_leaves_the_cache_off_by_default(
    isolated: dict[str, str], tmp_path: Path, redis_client: aioredis.Redis,
) -> None:
    config = config_with(tmp_path)  # cache: enabled: auto
    router, enricher = _router(isolated, config)
    batch = [_inbound({"request_id": f"r{i}", "prompt": "Write a python function"}, i)
             for i in range(5)]
    try:
        await router.route(batch)
        again = await router.route(batch)
        await enricher.flush()
    finally:
        await enricher.stop()
    assert {orjson.loads(o.value)["decision"]["tier"] for o in again} == {"keyword"}
    prefix = settings_from(isolated).redis_prefix
    assert not [k async for k in redis_client.scan_iter(match=f"{prefix}cache:*")]


class Order:
    """Records when the route pipeline's Redis round trip starts and ends, and when the
    classifier runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, router: Router) -> None:
        self.seen: list[str] = []
        original_execute = Pipeline.execute
        original_classify = router.cascade.classify

        async def execute(pipe: Pipeline, *args: Any, **kwargs: Any) -> Any:
            self.seen.append("redis sent")
            try:
                return await original_execute(pipe, *args, **kwargs)
            finally:
                self.seen.append("redis replied")

        async def classify(texts: list[str]) -> Any:
            self.seen.append(f"classify {len(texts)}")
            return await original_classify(texts)

        monkeypatch.setattr(Pipeline, "execute", execute)
        monkeypatch.setattr(router.cascade, "classify", classify)


@pytest.mark.parametrize(("size", "expected"), [
    (3, ["redis sent", "classify 3", "redis replied"]),  # the whole batch, during the trip
    (5, ["redis sent", "redis replied", "classify 4"]),  # over the bound: after, without
])                                                        # the cache hit
async def test_a_small_batch_is_classified_while_its_redis_round_trip_is_in_flight(
    isolated: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    size: int, expected: list[str],
) -> None:
    config = config_with(tmp_path, cache={"enabled": True})
    router, enricher = _router(isolated, config, overlap_max=4)
    try:
        await router.route([_inbound({"request_id": "seed", "prompt": "prompt 0"}, 0)])
        await enricher.flush()  # "prompt 0" is cached now
        batch = [_inbound({"request_id": f"r{i}", "prompt": f"prompt {i}"}, i)
                 for i in range(size)]
        order = Order(monkeypatch, router)
        out = await router.route(batch)
        seen = list(order.seen)  # not the write-back that `stop` flushes
    finally:
        await enricher.stop()
    assert seen == expected
    events = [orjson.loads(o.value) for o in out]
    assert [e["decision"]["tier"] == "cache" for e in events] == [True] + [False] * (size - 1)
    for event in events:
        t = event["timings_ms"]
        assert t["total"] <= t["queue"] + t["enrich"] + t["classify"] + 0.002
        assert t["total"] >= t["queue"] + max(t["enrich"], t["classify"]) - 0.002


async def test_the_enrich_on_sent_hook_runs_once_per_round_trip_and_only_then(
    isolated: dict[str, str], tmp_path: Path,
) -> None:
    config = config_with(tmp_path)
    settings = settings_from(isolated)
    request = RoutingRequested.model_validate({"request_id": "r1", "prompt": "hello"})
    live = Enricher(settings.redis_url.get_secret_value(), settings.redis_prefix, config)
    dead = Enricher("redis://127.0.0.1:1/0", settings.redis_prefix, config)
    try:
        # live, first: the connection's handshake goes first, the hook still runs once
        for enricher, requests, runs in ((live, [request], 1), (live, [request], 1),
                                         (live, [], 0), (dead, [request], 0),
                                         (dead, [request], 0)):  # skipped after a failure
            calls: list[int] = []
            enrichment = await enricher.enrich(requests, on_sent=partial(calls.append, 1))
            assert len(calls) == runs
            assert ("redis" in enrichment.degraded) == (enricher is dead)
    finally:
        await asyncio.gather(live.stop(), dead.stop())


async def test_a_classifier_bug_during_the_round_trip_fails_that_batch_not_the_connection(
    isolated: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = config_with(tmp_path)
    router, enricher = _router(isolated, config)
    keyword = router.cascade.keyword
    original = keyword.classify
    calls: list[int] = []

    def broken_once(texts: list[str]) -> Any:
        calls.append(len(texts))
        if len(calls) == 1:
            raise ZeroDivisionError("a bug")
        return original(texts)

    monkeypatch.setattr(keyword, "classify", broken_once)
    batch = [_inbound({"request_id": f"r{i}", "prompt": "hello there"}, i) for i in range(3)]
    try:
        with pytest.raises(ZeroDivisionError):  # the runtime turns this into `internal` failures
            await router.route(batch)
        out = await router.route(batch)  # the same connection pool serves the next batch
    finally:
        await enricher.stop()
    assert calls == [3, 3]
    events = [orjson.loads(o.value) for o in out]
    assert [e["degraded"] for e in events] == [[]] * 3
