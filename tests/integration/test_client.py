"""RoutingClient against the real broker: many concurrent waiters, timeouts, fire and forget."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from router_worker import topics
from router_worker.client import RoutingClient, RoutingTimeout
from router_worker.kafka import consumer_options
from router_worker.settings import Settings
from tests.conftest import settings_from
from tests.integration.workers import WorkerProcess

pytestmark = pytest.mark.integration

PROMPTS = [
    "Write a Python function that merges two sorted lists.",
    "hello there, how are you?",
    "What is the derivative of sin(x) * x^2?",
    "Summarize: the meeting moved to Thursday because the room was booked.",
]


async def read_topic(
    settings: Settings, topic: str, expected: int, timeout: float = 15.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic` from the beginning, once `expected` of them have arrived."""
    consumer = AIOKafkaConsumer(**consumer_options(settings), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        name = settings.topic(topic)
        await consumer.topics()
        partitions = [TopicPartition(name, p)
                      for p in sorted(consumer.partitions_for_topic(name) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            records += [r for recs in batches.values() for r in recs]
        return records
    finally:
        await consumer.stop()


async def test_thousand_concurrent_routes_each_resolve_with_their_own_request_id(
    isolated: dict[str, str], workdir: Path,
) -> None:
    worker = WorkerProcess(isolated, workdir).start()
    try:
        await worker.wait_ready()
        async with RoutingClient(settings_from(isolated)) as client:
            ids = [f"c-{i}" for i in range(1000)]
            # every 100th asks for a capability no model has: a failed reply, not a hang
            calls = [
                client.route(
                    PROMPTS[i % len(PROMPTS)], tenant="acme-budget" if i % 2 else "default",
                    request_id=rid, timeout=25,
                    constraints={"required_capabilities": ["teleportation"]} if i % 100 == 0
                    else {},
                )
                for i, rid in enumerate(ids)
            ]
            replies = await asyncio.gather(*calls)
            assert not client._waiters, "resolved waiters must be forgotten"
    finally:
        worker.stop()
    assert [r.request_id for r in replies] == ids
    for i, reply in enumerate(replies):
        if i % 100 == 0:
            assert reply.status == "failed"
            assert reply.event["error_code"] == "no_eligible_model"
            assert reply.decision is None
        else:
            assert reply.status == "completed", reply.event
            assert reply.decision is not None
            assert reply.event["tenant_id"] == ("acme-budget" if i % 2 else "default")


async def test_route_times_out_with_a_clear_message_when_no_worker_runs(
    isolated: dict[str, str],
) -> None:
    settings = settings_from(isolated)
    async with RoutingClient(settings) as client:
        started = time.monotonic()
        with pytest.raises(RoutingTimeout) as caught:
            await client.route("is anyone there?", request_id="lonely-1", timeout=1.0)
        elapsed = time.monotonic() - started
        assert not client._waiters
    message = str(caught.value)
    assert "lonely-1" in message
    assert "1.0s" in message
    assert settings.topic(topics.REQUESTED) in message
    assert settings.kafka_bootstrap in message
    assert caught.value.retriable
    assert 1.0 <= elapsed < 5.0


async def test_stop_cancels_pending_waiters(isolated: dict[str, str]) -> None:
    client = RoutingClient(settings_from(isolated))
    await client.start()
    waiter = client.expect("never-answered")
    pending = asyncio.ensure_future(client.wait("never-answered", waiter, timeout=30))
    await asyncio.sleep(0.05)
    await client.stop()
    with pytest.raises(asyncio.CancelledError):
        await pending
    assert waiter.cancelled()
    await client.stop()  # idempotent


async def test_publish_and_report_outcome_land_on_their_topics(isolated: dict[str, str]) -> None:
    settings = settings_from(isolated)
    async with RoutingClient(settings) as client:
        rid = await client.publish(
            "fire and forget", tenant="acme-budget", session_id="s-1",
            headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
            task_hint="chat",
        )
        raw_id = await client.publish(request_id="raw-1", payload=b"{not json")
        await client.report_outcome(rid, "gpt-4o-mini", success=True, latency_ms=812.5,
                                    input_tokens=12, output_tokens=40, cost_usd=0.0001)
    requested = {r.key: r for r in await read_topic(settings, topics.REQUESTED, 2)}
    outcomes = await read_topic(settings, topics.OUTCOME, 1)

    assert set(requested) == {rid.encode(), raw_id.encode()}
    body = orjson.loads(requested[rid.encode()].value)
    assert (body["request_id"], body["tenant_id"], body["prompt"]) == (
        rid, "acme-budget", "fire and forget")
    assert (body["session_id"], body["task_hint"]) == ("s-1", "chat")
    assert dict(requested[rid.encode()].headers)["traceparent"].startswith(b"00-0af7651916")
    assert requested[b"raw-1"].value == b"{not json"

    assert len(outcomes) == 1
    assert outcomes[0].key == rid.encode()
    outcome = orjson.loads(outcomes[0].value)
    assert (outcome["model"], outcome["success"], outcome["latency_ms"]) == (
        "gpt-4o-mini", True, 812.5)
    assert (outcome["input_tokens"], outcome["output_tokens"]) == (12, 40)
