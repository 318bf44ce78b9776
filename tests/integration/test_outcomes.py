"""End to end with real worker processes: outcomes change the next decisions; cache, session
affinity, budgets and rate limits as a caller sees them; outcome rows in Postgres."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from router_worker import topics
from router_worker.client import Reply, RoutingClient
from router_worker.kafka import consumer_options
from tests.conftest import settings_from
from tests.integration.configs import write_config
from tests.integration.workers import WorkerProcess

pytestmark = pytest.mark.integration

CHAT = "hello, how are you today?"  # chat/simple -> policy budget -> llama-3.1-8b first
MATH = "What is the integral of x * e^x?"
CODE = "Refactor this python class and fix the traceback in its unit test"


async def _until(client: RoutingClient, check: Any, prompt: str, timeout: float = 20.0,
                 **fields: Any) -> Reply:
    """Route `prompt` until `check(reply)` holds (outcomes are applied asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await client.route(prompt, **fields)
        if check(reply) or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.3)


def _model(reply: Reply) -> str:
    assert reply.status == "completed", reply.event
    return str(reply.event["decision"]["model"])


async def test_failures_open_the_breaker_and_outcomes_land_in_postgres(
    isolated: dict[str, str], workdir: Path,
) -> None:
    env = {**isolated, "ROUTER_CONFIG": str(write_config(workdir))}
    worker = WorkerProcess(env, workdir).start()
    settings = settings_from(env)
    try:
        await worker.wait_ready()
        async with RoutingClient(settings) as client:
            first = await client.route(CHAT)
            assert _model(first) == "llama-3.1-8b"
            for i in range(5):
                await client.report_outcome(f"f{i}", "llama-3.1-8b", success=False,
                                            latency_ms=900.0, cost_usd=0.001, policy="budget")
            after = await _until(client, lambda r: _model(r) != "llama-3.1-8b", CHAT)
            metrics = await worker.metrics()
        conn = await asyncpg.connect(settings.database_url.get_secret_value())
        try:
            deadline = time.monotonic() + 20
            rows: list[Any] = []
            while time.monotonic() < deadline and len(rows) < 5:
                rows = await conn.fetch(
                    f'SELECT request_id, success, policy FROM "{settings.database_schema}".'
                    "routing_outcomes ORDER BY request_id")
                await asyncio.sleep(0.3)
        finally:
            await conn.close()
    finally:
        worker.stop()
    decision = after.event["decision"]
    assert decision["model"] != "llama-3.1-8b", worker.tail()
    assert "llama-3.1-8b (unhealthy)" in decision["reason"]
    assert 'router_model_health{model="llama-3.1-8b"} 0.0' in metrics
    assert 'router_fallback_total{from="llama-3.1-8b"' in metrics
    assert [(r["request_id"], r["success"], r["policy"]) for r in rows] == [
        (f"f{i}", False, "budget") for i in range(5)]


async def test_cache_session_affinity_and_its_ttl(
    isolated: dict[str, str], workdir: Path,
) -> None:
    config = write_config(workdir, affinity={"ttl_s": 2}, cache={"enabled": True})
    env = {**isolated, "ROUTER_CONFIG": str(config)}
    worker = WorkerProcess(env, workdir).start()
    try:
        await worker.wait_ready()
        async with RoutingClient(settings_from(env)) as client:
            miss = await client.route(CODE)
            hit = await client.route("  refactor this PYTHON class and fix the traceback in "
                                     "its unit test ")
            pinned = _model(await client.route(MATH, session_id="s1"))
            same = await client.route(CHAT, session_id="s1")
            await asyncio.sleep(2.5)
            expired = await client.route(CHAT, session_id="s1")
            metrics = await worker.metrics()
    finally:
        worker.stop()
    assert miss.event["decision"]["tier"] != "cache"
    assert hit.event["decision"]["tier"] == "cache"
    assert hit.event["decision"]["model"] == miss.event["decision"]["model"]
    assert "router_cache_hits_total 2.0" in metrics  # the code prompt and the last chat one
    assert pinned == "gpt-4o-mini"
    assert _model(same) == pinned
    assert "session affinity" in same.event["decision"]["reason"]
    assert _model(expired) == "llama-3.1-8b"  # the pin expired: the policy's first choice


async def _alerts(env: dict[str, str], n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    settings = settings_from(env)
    consumer = AIOKafkaConsumer(settings.topic(topics.ALERTS), **consumer_options(settings),
                                group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    found: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout
        while len(found) < n and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            found += [orjson.loads(r.value) for recs in batches.values() for r in recs]
    finally:
        await consumer.stop()
    return found


async def test_budgets_downgrade_or_fail_and_rate_limits_fail_with_rate_limited(
    isolated: dict[str, str], workdir: Path,
) -> None:
    env = {**isolated, "ROUTER_CONFIG": str(write_config(workdir))}
    worker = WorkerProcess(env, workdir).start()
    try:
        await worker.wait_ready()
        async with RoutingClient(settings_from(env)) as client:
            before = _model(await client.route(CODE, tenant="spendy"))
            for tenant in ("spendy", "strict"):
                await client.report_outcome(f"{tenant}-big", "claude-sonnet-4", success=True,
                                            latency_ms=100.0, cost_usd=1.5, tenant_id=tenant)
            downgraded = await _until(
                client, lambda r: "budget" in r.event["decision"]["reason"], CODE,
                tenant="spendy")
            failed = await _until(client, lambda r: r.status == "failed", CODE, tenant="strict")
            limited = await asyncio.gather(*(client.route(CHAT, tenant="limited")
                                             for _ in range(8)))
            metrics = await worker.metrics()
        alerts = await _alerts(env, 2)
    finally:
        worker.stop()
    assert before == "qwen2.5-coder-32b"  # code/simple -> quick-code
    assert _model(downgraded) == "gpt-4o-mini", worker.tail()  # its cheapest eligible model
    assert "budget exceeded" in downgraded.event["decision"]["reason"]
    assert failed.event["error_code"] == "budget_exceeded"
    statuses = sorted(r.event.get("error_code", "completed") for r in limited)
    assert statuses == ["completed"] * 3 + ["rate_limited"] * 5
    assert 'router_budget_used_ratio{tenant="spendy"} 1.5' in metrics
    assert sorted((a["tenant_id"], a["kind"]) for a in alerts) == [
        ("spendy", "budget_exceeded"), ("strict", "budget_exceeded")]
