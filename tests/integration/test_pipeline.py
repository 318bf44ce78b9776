"""End to end on the real broker, Redis and Postgres: every request gets exactly one row."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from router_worker import topics
from router_worker.agents.sink import SinkAgent
from router_worker.config import load_config
from router_worker.kafka import producer_options
from router_worker.metrics import Metrics, create_metrics
from router_worker.settings import DEFAULT_CONFIG, Settings
from tests.conftest import settings_from
from tests.integration.workers import WorkerProcess, wait_rows

pytestmark = pytest.mark.integration

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "hello, how are you today?",
    "Our kubernetes ingress returns 503 after the deploy, what should I check?",
    "What is the integral of x * e^x?",
    "Summarize: the board met on Monday and agreed to delay the launch by two weeks.",
    "Write a limerick about a cat who learned to code.",
    "Explain the causes of the French Revolution in detail.",
    "Plan a 3-day trip with 4 museums, no more than 2 per day, closed on Mondays.",
]

BAD_PAYLOADS: list[tuple[str, bytes]] = [
    ("invalid_json", b"{not json"),
    ("invalid_json", b'{"request_id": "\xff\xfe bad utf8", "prompt": "x"}'),
    ("schema_violation", orjson.dumps({"request_id": "X", "prompt": 42})),
    ("schema_violation", orjson.dumps({"request_id": "X", "tenant_id": "a"})),
    ("too_large", orjson.dumps({"request_id": "X", "prompt": "y" * (64 * 1024 + 10)})),
]


async def _publish(env: dict[str, str], n_valid: int, n_bad: int) -> dict[str, str]:
    """Publish valid and bad requests; returns request_id -> expected status/code."""
    settings = settings_from(env)
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    expected: dict[str, str] = {}
    rng = random.Random(7)
    futures = []
    try:
        for i in range(n_valid):
            rid = f"ok-{i}"
            body = {"request_id": rid, "tenant_id": rng.choice(["default", "acme-budget"]),
                    "prompt": rng.choice(PROMPTS)}
            expected[rid] = "completed"
            futures.append(await producer.send(settings.topic(topics.REQUESTED),
                                               orjson.dumps(body), key=rid.encode()))
        for i in range(n_bad):
            code, payload = BAD_PAYLOADS[i % len(BAD_PAYLOADS)]
            rid = f"bad-{i}"
            # the bad payloads carry request_id "X" or none: the Kafka key identifies them
            payload = payload.replace(b'"X"', orjson.dumps(rid))
            expected[rid] = code
            futures.append(await producer.send(settings.topic(topics.REQUESTED), payload,
                                               key=rid.encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return expected


async def _rows(env: dict[str, str]) -> list[asyncpg.Record]:
    settings = settings_from(env)
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        return list(await conn.fetch(
            f'SELECT request_id, status, model, error_code, tier, degraded '
            f'FROM "{settings.database_schema}".routing_events'))
    finally:
        await conn.close()


async def test_thousand_valid_and_hundred_bad_requests_each_land_exactly_once(
    isolated: dict[str, str], workdir: Path,
) -> None:
    worker = WorkerProcess(isolated, workdir).start()
    try:
        await worker.wait_ready()
        expected = await _publish(isolated, 1000, 100)
        settings = settings_from(isolated)
        count = await wait_rows(settings.database_url.get_secret_value(),
                                settings.database_schema, 1100)
        assert count == 1100, worker.tail()
        rows = await _rows(isolated)
    finally:
        worker.stop()
    by_id = {r["request_id"]: r for r in rows}
    assert len(by_id) == len(rows) == 1100
    models = set(load_config(DEFAULT_CONFIG).models)
    for rid, want in expected.items():
        row = by_id[rid]
        if want == "completed":
            assert row["status"] == "completed"
            assert row["model"] in models
        else:
            assert (row["status"], row["error_code"]) == ("failed", want), rid
    assert sum(r["status"] == "completed" for r in rows) == 1000


async def test_two_workers_in_one_group_split_partitions_and_process_everything_once(
    isolated: dict[str, str], workdir: Path,
) -> None:
    first = WorkerProcess(isolated, workdir, "w1").start()
    second = WorkerProcess(isolated, workdir, "w2").start()
    try:
        await asyncio.gather(first.wait_ready(), second.wait_ready())
        await asyncio.sleep(4)  # let the group settle with both members
        await _publish(isolated, 1000, 0)
        settings = settings_from(isolated)
        count = await wait_rows(settings.database_url.get_secret_value(),
                                settings.database_schema, 1000)
        handled = [_routed(await w.metrics()) for w in (first, second)]
    finally:
        first.stop()
        second.stop()
    assert count == 1000
    assert all(n > 0 for n in handled), handled
    assert sum(handled) >= 1000


def _routed(metrics_text: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("router_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_redis_unreachable_still_decides_and_marks_degraded(
    isolated: dict[str, str], workdir: Path,
) -> None:
    env = {**isolated, "ROUTER_REDIS_URL": "redis://127.0.0.1:1/0"}
    worker = WorkerProcess(env, workdir).start()
    try:
        await worker.wait_ready()
        await _publish(env, 20, 0)
        settings = settings_from(env)
        count = await wait_rows(settings.database_url.get_secret_value(),
                                settings.database_schema, 20)
        rows = await _rows(env)
    finally:
        worker.stop()
    assert count == 20
    assert all(r["status"] == "completed" and "redis" in r["degraded"] for r in rows)


async def test_faust_cli_runs_the_worker_with_only_router_settings(
    isolated: dict[str, str], workdir: Path,
) -> None:
    worker = WorkerProcess(isolated, workdir, "faust", via_faust=True).start()
    try:
        await worker.wait_ready()
        await _publish(isolated, 10, 2)
        settings = settings_from(isolated)
        count = await wait_rows(settings.database_url.get_secret_value(),
                                settings.database_schema, 12)
    finally:
        worker.stop()
    assert count == 12, worker.tail()


async def test_foreign_record_postgres_rejects_is_skipped_and_the_rest_still_lands(
    isolated: dict[str, str], workdir: Path,
) -> None:
    """A record on the completed topic that Postgres refuses (not an outage) must not wedge
    the sink: the good rows of the same batch and every later batch still become durable."""
    settings = settings_from(isolated)
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        bad = {"request_id": "foreign-1", "tenant_id": "x", "decided_at": "2026-01-01T00:00:00Z",
               "decision": {"model": "m", "confidence": "high"}}
        await producer.send_and_wait(settings.topic(topics.COMPLETED), orjson.dumps(bad),
                                     key=b"foreign-1")
    finally:
        await producer.stop()
    worker = WorkerProcess(isolated, workdir).start()
    try:
        await worker.wait_ready()
        await _publish(isolated, 50, 0)
        count = await wait_rows(settings.database_url.get_secret_value(),
                                settings.database_schema, 50)
    finally:
        worker.stop()
    assert count == 50, worker.tail()
    rows = await _rows(isolated)
    assert "foreign-1" not in {r["request_id"] for r in rows}



async def _trickle_into_a_sink(
    settings: Settings, metrics: Metrics, prefix: str, wait_for_rows: bool
) -> int | None:
    """Run a SinkAgent while 30 completed events arrive 10 ms apart; stop it afterwards
    (once every row is in, with `wait_for_rows`, else at once). Returns the row count waited
    for, or None."""
    sink = SinkAgent(settings, metrics)
    producer = AIOKafkaProducer(**{**producer_options(settings), "linger_ms": 0})
    await producer.start()
    await sink.start()
    try:
        for i in range(30):
            event = {"request_id": f"{prefix}-{i}", "tenant_id": "t", "decision": {"model": "m"},
                     "created_at": "2026-01-01T00:00:00Z", "decided_at": "2026-01-01T00:00:01Z"}
            await producer.send_and_wait(settings.topic(topics.COMPLETED), orjson.dumps(event),
                                         key=f"{prefix}-{i}".encode())
            await asyncio.sleep(0.01)
        if not wait_for_rows:
            return None
        return await wait_rows(settings.database_url.get_secret_value(),
                               settings.database_schema, 30)
    finally:
        await sink.stop()
        await producer.stop()
        assert sink.crash_reason is None, repr(sink.crash_reason)


async def test_sink_fills_a_batch_from_a_trickle_within_its_wait(
    isolated: dict[str, str],
) -> None:
    """Under a trickle the sink keeps filling a batch for `sink_max_wait_ms` after its first
    events arrive (two fetches merged into one write and one commit): 30 events produced
    10 ms apart become a few writes, and every one of them becomes exactly one row. (On the
    embedded broker a fetch waits out its expiry anyway, so the bound holds without the fill
    too; on Kafka, without it, every fetch would be a write.)"""
    metrics = create_metrics()
    settings = settings_from({**isolated, "ROUTER_SINK_MAX_WAIT_MS": "250"})
    count = await _trickle_into_a_sink(settings, metrics, "trickle", wait_for_rows=True)
    assert count == 30
    writes = metrics.registry.get_sample_value("router_batch_size_count", {"agent": "sink"})
    # ~0.4 s of events over 0.25 s windows: 2-4 writes (a write per event would be 30).
    assert writes is not None
    assert writes <= 8, writes


async def test_a_stopping_sink_writes_and_commits_the_batch_in_hand(
    isolated: dict[str, str],
) -> None:
    """Stopped in the middle of a trickle (graceful shutdown), the sink finishes the batch it
    fetched: every event it wrote is committed and nothing committed is unwritten, so a
    restarted sink reads nothing twice."""
    settings = settings_from({**isolated, "ROUTER_SINK_MAX_WAIT_MS": "250"})
    await _trickle_into_a_sink(settings, create_metrics(), "stop", wait_for_rows=False)
    rows = await _rows(isolated)
    reader = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                              group_id=settings.sink_group, enable_auto_commit=False)
    await reader.start()
    try:
        topic = settings.topic(topics.COMPLETED)
        partitions = sorted(reader.partitions_for_topic(topic) or ())
        committed = [await reader.committed(TopicPartition(topic, p)) for p in partitions]
    finally:
        await reader.stop()
    assert rows, "the sink wrote nothing before it stopped"
    assert sum(c or 0 for c in committed) == len(rows), (committed, len(rows))
