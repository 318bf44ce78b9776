"""A running worker can be watched: metrics move, logs carry ids but no prompt, traces propagate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from router_worker import topics
from router_worker.client import Reply, RoutingClient
from router_worker.enrich import HEALTH_DOWN, Keys
from tests.conftest import settings_from
from tests.integration.test_client import read_topic
from tests.integration.workers import WorkerProcess, wait_rows

pytestmark = pytest.mark.integration

CANARY = "CANARY-7f3a9c-do-not-log"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "vendor=opaque"
Sample = tuple[str, dict[str, str], float]


def parse(text: str) -> list[Sample]:
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for n, ls, v in samples if n == name and labels.items() <= ls.items())


async def route_all(client: RoutingClient, bad: dict[str, bytes], timeout: float = 20) -> dict[
        str, Reply]:
    """Wait for the terminal events of raw payloads published under the given keys."""
    waiters = {rid: client.expect(rid) for rid in bad}
    for rid, payload in bad.items():
        await client.publish(request_id=rid, payload=payload)
    return {rid: await client.wait(rid, w, timeout) for rid, w in waiters.items()}


async def test_metrics_move_with_the_right_labels(
    isolated: dict[str, str], workdir: Path,
) -> None:
    settings = settings_from(isolated)
    # llama-3.1-8b heads the `budget` policy of tenant acme-budget: with its circuit open,
    # every acme-budget decision is a fallback to the next model.
    health = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    await health.hset(Keys(settings.redis_prefix).health(), "llama-3.1-8b", HEALTH_DOWN)
    await health.aclose()
    worker = WorkerProcess(isolated, workdir).start()
    try:
        await worker.wait_ready()
        async with RoutingClient(settings) as client:
            replies = await asyncio.gather(*(
                client.route(f"hello, how are you today? ({i})", tenant="acme-budget", timeout=20)
                for i in range(20)
            ), *(  # ops requests of the default tenant: policies without llama-3.1-8b
                client.route(f"kubectl rollout is stuck ({i})", task_hint="ops", timeout=20)
                for i in range(10)
            ))
            failed = await route_all(client, {
                "bad-json": b"{not json",
                "bad-schema": orjson.dumps({"request_id": "bad-schema", "prompt": 42}),
            })
        assert all(r.status == "completed" for r in replies)
        assert {r.event["error_code"] for r in failed.values()} == {
            "invalid_json", "schema_violation"}
        assert await wait_rows(settings.database_url.get_secret_value(),
                               settings.database_schema, 32) == 32
        # route-group lag is sampled every 2 s; wait for it and for the sink's rows
        deadline = time.monotonic() + 15
        while True:
            samples = parse(await worker.metrics())
            lag = [ls for n, ls, _ in samples if n == "router_consumer_lag"
                   and ls["group"] == settings.app_id]
            if (lag and value(samples, "router_sink_rows_total") >= 32) or (
                    time.monotonic() > deadline):
                break
            await asyncio.sleep(0.5)
    finally:
        worker.stop()

    assert value(samples, "router_requests_total", tenant="acme-budget", status="completed") == 20
    assert value(samples, "router_requests_total", tenant="default", status="completed") == 10
    assert value(samples, "router_requests_total", status="failed") == 2
    assert value(samples, "router_failed_total", error_code="invalid_json") == 1
    assert value(samples, "router_failed_total", error_code="schema_violation") == 1
    budget = [r.decision for r in replies[:20]]
    assert all(d is not None and d["model"] != "llama-3.1-8b" for d in budget)
    assert value(samples, "router_decisions_total", policy="budget") == 20
    assert value(samples, "router_decisions_total", category="ops") == 10
    assert value(samples, "router_decisions_total") == 30
    chosen = budget[0]["model"] if budget[0] else ""
    assert value(samples, "router_fallback_total", **{"from": "llama-3.1-8b", "to": chosen}) == 20
    for stage in ("queue", "enrich", "classify", "decide", "total"):
        assert value(samples, "router_stage_latency_ms_count", stage=stage) >= 1, stage
    assert value(samples, "router_batch_size_sum", agent="route") == 32
    assert value(samples, "router_batch_size_count", agent="sink") >= 1
    assert value(samples, "router_model_health", model="llama-3.1-8b") == 0
    assert value(samples, "router_model_health", model="gpt-4o-mini") == 1
    spend = value(samples, "router_spend_usd_total", tenant="acme-budget")
    expected = sum(d["estimated_cost_usd"] for d in budget if d)
    assert spend == pytest.approx(expected, rel=1e-6)
    assert spend > 0
    assert value(samples, "router_spend_usd_total", tenant="default") > 0
    assert 0.0 <= value(samples, "router_cache_hit_ratio") <= 1.0
    lag_topics = {ls["topic"] for n, ls, _ in samples
                  if n == "router_consumer_lag" and ls["group"] == settings.app_id}
    # the requested topic, plus the outcome topic where the outcome agent shares the group
    assert settings.topic(topics.REQUESTED) in lag_topics
    assert not any(t.startswith(f"{settings.app_id}-") for t in lag_topics)  # Faust-internal
    assert any(n == "router_consumer_lag" and ls["group"] == settings.sink_group
               for n, ls, _ in samples)
    assert value(samples, "router_sink_rows_total", status="completed") == 30
    assert value(samples, "router_sink_rows_total", status="failed") == 2
    assert value(samples, "router_sink_lag") == 0


async def test_logs_carry_request_ids_and_never_the_prompt(
    isolated: dict[str, str], workdir: Path,
) -> None:
    env = {**isolated, "ROUTER_LOG_LEVEL": "debug", "ROUTER_LOG_FORMAT": "json"}
    settings = settings_from(env)
    worker = WorkerProcess(env, workdir).start()
    try:
        await worker.wait_ready()
        async with RoutingClient(settings) as client:
            ok = await client.route(f"Please summarize this: {CANARY}", request_id="ok-1",
                                    headers={"correlation_id": "corr-ok-1"}, timeout=20)
            chat = await client.route(
                None, request_id="ok-2", timeout=20,  # type: ignore[arg-type]
                messages=[{"role": "user", "content": f"hi {CANARY}"}])
            no_model = await client.route(
                CANARY, request_id="nomodel-1", timeout=20,
                constraints={"required_capabilities": ["teleportation"]})
            failed = await route_all(client, {
                "json-1": b'{"request_id": "json-1", "prompt": "' + CANARY.encode(),
                "schema-1": orjson.dumps({"request_id": "schema-1", "prompt": CANARY,
                                          "constraints": {"max_cost_usd": -1}}),
                "large-1": orjson.dumps({"request_id": "large-1",
                                         "prompt": CANARY * (70_000 // len(CANARY))}),
            })
        await asyncio.sleep(0.5)  # let the last lines reach the log file
    finally:
        worker.stop()
    assert (ok.status, chat.status, no_model.status) == ("completed", "completed", "failed")
    assert {r.event["error_code"] for r in failed.values()} == {
        "invalid_json", "schema_violation", "too_large"}

    text = worker.log_path.read_text(errors="replace")
    assert CANARY not in text
    lines = [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]
    about = {line["request_id"]: line for line in lines if "request_id" in line}
    assert set(about) >= {"ok-1", "ok-2", "nomodel-1", "json-1", "schema-1", "large-1"}, text
    for line in about.values():
        assert line["correlation_id"], line
        assert "tenant_id" in line, line
        assert line["level"] in {"debug", "info"}, line
    assert about["ok-1"]["correlation_id"] == "corr-ok-1"
    assert about["ok-1"]["event"] == "request_decided"
    assert about["nomodel-1"]["correlation_id"] == "nomodel-1"
    assert about["nomodel-1"]["tenant_id"] == "default"


async def test_completed_and_failed_events_carry_the_requests_trace_headers(
    isolated: dict[str, str], workdir: Path,
) -> None:
    settings = settings_from(isolated)
    traced = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE, "correlation_id": "corr-42"}
    worker = WorkerProcess(isolated, workdir).start()
    try:
        await worker.wait_ready()
        async with RoutingClient(settings) as client:
            for rid, payload in {
                "t-ok": orjson.dumps({"request_id": "t-ok", "prompt": "hello there"}),
                "t-json": b"{broken",
                "t-schema": orjson.dumps({"request_id": "t-schema"}),
                "t-nomodel": orjson.dumps({"request_id": "t-nomodel", "prompt": "hi",
                                           "constraints": {"allowed_models": ["nope"]}}),
            }.items():
                await client.publish(request_id=rid, payload=payload,
                                     headers={**traced, "x-private": "not propagated"})
            await client.publish("no headers at all", request_id="t-plain")
        completed = await read_topic(settings, topics.COMPLETED, 2)
        failed = await read_topic(settings, topics.FAILED, 3)
    finally:
        worker.stop()
    headers = {r.key.decode(): {k: v.decode() for k, v in r.headers}
               for r in completed + failed if r.key}
    assert {r.key for r in completed} == {b"t-ok", b"t-plain"}
    assert {r.key for r in failed} == {b"t-json", b"t-schema", b"t-nomodel"}
    for rid in ("t-ok", "t-json", "t-schema", "t-nomodel"):
        assert headers[rid] == traced, rid
    assert headers["t-plain"] == {"correlation_id": "t-plain"}
