"""Delivery guarantees under real faults: worker crash, SIGTERM, rebalance, Redis, Postgres and
broker outages, on the real broker, Redis and Postgres (loopback only, bounded in time)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from router_worker import embedded, topics
from router_worker.commands.admin import apply_topics
from router_worker.embedded import EmbeddedStack
from router_worker.kafka import consumer_options, producer_options
from router_worker.settings import Settings
from router_worker.store.connect import quote_ident
from router_worker.store.migrate import migrate
from tests.conftest import settings_from
from tests.integration.workers import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "hello, how are you today?",
    "Our kubernetes ingress returns 503 after the deploy, what should I check?",
    "What is the integral of x * e^x?",
    "Summarize: the board met on Monday and agreed to delay the launch by two weeks.",
)


# --- helpers -------------------------------------------------------------------------------


def request_bytes(rid: str, i: int) -> bytes:
    return orjson.dumps({"request_id": rid, "tenant_id": "default",
                         "prompt": PROMPTS[i % len(PROMPTS)]})


async def publish(settings: Settings, ids: list[str], rate_per_s: float | None = None) -> None:
    """Publish one valid request per id, all at once or paced at `rate_per_s`."""
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    topic = settings.topic(topics.REQUESTED)
    try:
        futures = []
        began = time.monotonic()
        for i, rid in enumerate(ids):
            futures.append(await producer.send(topic, request_bytes(rid, i), key=rid.encode()))
            if rate_per_s is not None and i % 50 == 49:
                ahead = began + (i + 1) / rate_per_s - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


@dataclass
class Outputs:
    """Every record read back from the completed and failed topics."""

    keys: list[str] = field(default_factory=list)
    values: dict[str, list[dict[str, object]]] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return len(self.keys) - len(set(self.keys))


async def read_outputs(settings: Settings, expected: set[str], timeout: float = 60.0,
                       idle_s: float = 1.0) -> Outputs:
    """Read both output topics from the start until every expected key was seen and nothing
    new arrived for `idle_s` (the broker's end offsets cannot be used to count records)."""
    names = [settings.topic(topics.COMPLETED), settings.topic(topics.FAILED)]
    consumer = AIOKafkaConsumer(**consumer_options(settings), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    out = Outputs()
    try:
        await consumer.topics()
        tps = [TopicPartition(t, p) for t in names for p in consumer.partitions_for_topic(t) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    key = (record.key or b"").decode("utf-8", errors="replace")
                    out.keys.append(key)
                    out.values.setdefault(key, []).append(orjson.loads(record.value or b"{}"))
                last_new = time.monotonic()
            if expected <= out.values.keys() and time.monotonic() - last_new > idle_s:
                break
    finally:
        await consumer.stop()
    return out


async def row_ids(settings: Settings) -> list[str]:
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        rows = await conn.fetch(
            f"SELECT request_id FROM {quote_ident(settings.database_schema)}.routing_events")
        return [r["request_id"] for r in rows]
    finally:
        await conn.close()


async def wait_for_rows(settings: Settings, expected: set[str], timeout: float = 60.0,
                        settle_s: float = 0.5) -> list[str]:
    """Poll until every expected request_id has a row; then a short settle for stragglers."""
    deadline = time.monotonic() + timeout
    ids: list[str] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            ids = await row_ids(settings)
            if expected <= set(ids):
                await asyncio.sleep(settle_s)
                return await row_ids(settings)
        await asyncio.sleep(0.2)
    return ids


def metric(text: str, name: str, labels: str | None = None) -> float:
    """Sum of a metric's samples in Prometheus text (optionally those matching `labels`)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in "{ " and (
                labels is None or labels in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def routed(worker: WorkerProcess) -> float:
    try:
        return metric(await worker.metrics(), "router_requests_total")
    except Exception:  # the web server is not up yet or the worker is going away
        return 0.0


async def wait_routed(worker: WorkerProcess, at_least: float, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = await routed(worker)
        if n >= at_least:
            return n
        assert worker.proc is not None, worker.name
        assert worker.proc.poll() is None, worker.tail()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{worker.name} routed < {at_least} in {timeout}s: {worker.tail()}")


def assert_one_row_each(ids: list[str], expected: set[str]) -> None:
    counts = Counter(ids)
    assert set(counts) == expected, (len(expected - set(counts)), len(set(counts) - expected))
    assert max(counts.values()) == 1


@contextlib.contextmanager
def workers() -> Iterator[list[WorkerProcess]]:
    """Every worker a test starts; all are stopped (killed if need be) at the end."""
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.stop(signal.SIGKILL)


def report(name: str, **numbers: object) -> None:
    """Measured numbers, shown with `-s` and kept in the junit/terminal output of failures."""
    print(f"\n[reliability] {name}: " + " ".join(f"{k}={v}" for k, v in numbers.items()))


# --- 1. crash ------------------------------------------------------------------------------


async def test_kill_9_mid_stream_then_restart_leaves_exactly_one_row_per_request(
    isolated: dict[str, str], workdir: Path,
) -> None:
    settings = settings_from(isolated)
    ids = [f"crash-{i}" for i in range(10_000)]
    expected = set(ids)
    with workers() as started:
        first = WorkerProcess(isolated, workdir, "w-crash").start()
        started.append(first)
        await first.wait_ready()
        publisher = asyncio.create_task(publish(settings, ids))
        at_kill = await wait_routed(first, 3000)
        first.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        await publisher
        rows_at_kill = len(await row_ids(settings))
        second = WorkerProcess(isolated, workdir, "w-restart").start()
        started.append(second)
        rows = await wait_for_rows(settings, expected, timeout=90)
        recovered_s = time.monotonic() - killed_at
        assert_one_row_each(rows, expected)
        outputs = await read_outputs(settings, expected)
    report("crash", routed_at_kill=at_kill, rows_at_kill=rows_at_kill, rows=len(rows),
           topic_records=len(outputs.keys), topic_distinct=len(set(outputs.keys)),
           topic_duplicates=outputs.duplicates, recovered_s=round(recovered_s, 1))
    assert set(outputs.keys) == expected
    assert all(v["decision"] for vs in outputs.values.values() for v in vs)


# --- 2. graceful shutdown ------------------------------------------------------------------


async def test_sigterm_drains_commits_and_nothing_is_reprocessed_after_restart(
    isolated: dict[str, str], workdir: Path,
) -> None:
    settings = settings_from(isolated)
    ids = [f"term-{i}" for i in range(6000)]
    expected = set(ids)
    with workers() as started:
        first = WorkerProcess(isolated, workdir, "w-term").start()
        started.append(first)
        await first.wait_ready()
        publisher = asyncio.create_task(publish(settings, ids, rate_per_s=2000))
        await wait_routed(first, 1500)
        began = time.monotonic()
        code = await asyncio.to_thread(first.stop, signal.SIGTERM, 30.0)
        stop_s = time.monotonic() - began
        await publisher
        before = await read_outputs(settings, set(), idle_s=1.0)
        second = WorkerProcess(isolated, workdir, "w-term-2").start()
        started.append(second)
        rows = await wait_for_rows(settings, expected, timeout=90)
        assert_one_row_each(rows, expected)
        outputs = await read_outputs(settings, expected)
    report("sigterm", exit_code=code, stop_s=round(stop_s, 2),
           decided_before_restart=len(before.keys), topic_records=len(outputs.keys),
           topic_distinct=len(set(outputs.keys)), topic_duplicates=outputs.duplicates)
    assert code == 0, first.tail()
    assert before.duplicates == 0
    # Nothing decided before the SIGTERM was decided again after the restart.
    assert outputs.duplicates == 0, Counter(outputs.keys).most_common(3)


# --- 3. rebalance --------------------------------------------------------------------------


async def ready(worker: WorkerProcess) -> bool:
    """Whether the worker's route agent is alive (/readyz drops to 503 when it dies)."""
    try:
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"http://127.0.0.1:{worker.port}/readyz", timeout=2)
            return reply.status_code == 200
    except httpx.HTTPError:
        return False


async def test_adding_and_removing_a_worker_mid_stream_loses_and_strands_nothing(
    isolated: dict[str, str], workdir: Path,
) -> None:
    settings = settings_from(isolated)
    ids = [f"reb-{i}" for i in range(8000)]
    tail = [f"reb-tail-{i}" for i in range(1000)]
    with workers() as started:
        first = WorkerProcess(isolated, workdir, "w-a").start()
        started.append(first)
        await first.wait_ready()
        publisher = asyncio.create_task(publish(settings, ids, rate_per_s=800))
        await wait_routed(first, 1000)
        second = WorkerProcess(isolated, workdir, "w-b").start()
        started.append(second)
        await second.wait_ready()
        await wait_routed(second, 300, timeout=30)  # it got partitions and processes them
        by_second = await routed(second)
        code = await asyncio.to_thread(second.stop, signal.SIGTERM, 30.0)
        removed_at = time.monotonic()
        await publisher
        rows = await wait_for_rows(settings, set(ids), timeout=60)
        drained_s = time.monotonic() - removed_at
        assert_one_row_each(rows, set(ids))
        # After both rebalances the survivor still fetches every partition: a fresh burst is
        # decided entirely by it.
        before_tail = await routed(first)
        await publish(settings, tail)
        rows = await wait_for_rows(settings, set(ids) | set(tail), timeout=30)
        after_tail = await routed(first)
        assert await ready(first), first.tail()
        outputs = await read_outputs(settings, set(ids) | set(tail))
        log_text = first.log_path.read_text(errors="replace")
    report("rebalance", second_exit=code, routed_by_second=by_second,
           tail_routed_by_first=after_tail - before_tail,
           drained_after_removal_s=round(drained_s, 1),
           rows=len(rows), topic_records=len(outputs.keys),
           topic_distinct=len(set(outputs.keys)), topic_duplicates=outputs.duplicates)
    assert code == 0
    assert_one_row_each(rows, set(ids) | set(tail))
    assert after_tail - before_tail >= len(tail)
    assert set(outputs.keys) == set(ids) | set(tail)
    assert "Traceback" not in log_text, log_text[-3000:]
    assert "crashed" not in log_text, log_text[-3000:]



# --- dedicated services that a test may stop and start again -------------------------------


def port_of(url: str) -> int:
    match = re.search(r":(\d+)(?:/|$)", url.rsplit("@", 1)[-1])
    assert match, url
    return int(match.group(1))


async def restart_on_port(stack: EmbeddedStack, port: int) -> None:
    """Start a stopped stack again on the same port (and the same data directory).

    EmbeddedStack picks a fresh port on every start; clients configured with the old URL must
    find the service where it was, so the port picker is pinned for this one start."""
    original = embedded.free_port
    embedded.free_port = lambda: port
    try:
        await stack.start()
    finally:
        embedded.free_port = original


@contextlib.asynccontextmanager
async def dedicated(run_dir: Path, service: str) -> AsyncIterator[EmbeddedStack]:
    """A private embedded `service` this test may stop; stopped whatever happens."""
    stack = EmbeddedStack(run_dir, kafka=service == "kafka", redis=service == "redis",
                          postgres=service == "postgres")
    await stack.start()
    try:
        yield stack
    finally:
        await stack.stop()


async def decisions_by_time(settings: Settings, expected: set[str]) -> list[tuple[float, bool]]:
    """(decided_at as epoch seconds, degraded by redis) of every completed event, in order."""
    outputs = await read_outputs(settings, expected)
    found = []
    for values in outputs.values.values():
        for value in values:
            stamp = datetime.fromisoformat(str(value["decided_at"])).timestamp()
            found.append((stamp, "redis" in value.get("degraded", [])))  # type: ignore[operator]
    return sorted(found)



async def test_after_a_redis_restart_no_pooled_connection_is_stale(
    isolated: dict[str, str], workdir: Path,
) -> None:
    """A pooled connection that sat idle through an outage must not fail the first batch that
    draws it after Redis is back (it did: "Connection closed by server", then another second
    of degraded decisions)."""
    from router_worker.config import load_config
    from router_worker.enrich import Enricher
    from router_worker.events import RoutingRequested

    settings = settings_from(isolated)
    async with dedicated(workdir / "redis", "redis") as stack:
        url = stack.urls.redis_url
        assert url is not None
        enricher = Enricher(url, settings.redis_prefix, load_config(settings.config))
        requests = [RoutingRequested(request_id="stale-1", tenant_id="t", prompt="hello")]
        try:
            await enricher.warm(2)  # two pooled connections, as the route agent keeps
            await stack.stop()
            assert "redis" in (await enricher.enrich(requests)).degraded
            await restart_on_port(stack, port_of(url))
            await asyncio.sleep(1.1)  # past the enricher's pause after a failure
            # Four at once draw every pooled connection, the idle one included.
            results = await asyncio.gather(*(enricher.enrich(requests) for _ in range(4)))
        finally:
            await enricher.stop()
    assert [r.degraded for r in results] == [[], [], [], []]


# --- 8. no secrets or prompt text in logs ---------------------------------------------------


async def test_worker_logs_never_show_prompts_or_passwords(
    isolated: dict[str, str], workdir: Path,
) -> None:
    prompt_canary = "PROMPT-CANARY-5d1e"
    password = "PW-CANARY-93bc"
    redis = isolated["ROUTER_REDIS_URL"].replace("redis://", f"redis://:{password}@", 1)
    database = isolated["ROUTER_DATABASE_URL"].replace("postgres@", f"postgres:{password}@", 1)
    # passwords in both URLs (Redis without a password and Postgres with trust accept them)
    env = {**isolated, "ROUTER_REDIS_URL": redis, "ROUTER_DATABASE_URL": database,
           "ROUTER_LOG_LEVEL": "debug"}
    settings = settings_from(env)
    producer = AIOKafkaProducer(**producer_options(settings))
    bodies = [
        {"request_id": "canary-ok", "prompt": f"write code {prompt_canary}"},
        {"request_id": "canary-schema", "prompt": prompt_canary, "tenant_id": 7},
        {"request_id": "canary-large", "prompt": prompt_canary * 5000},
    ]
    with workers() as started:
        worker = WorkerProcess(env, workdir, "w-canary").start()
        started.append(worker)
        await worker.wait_ready()
        await producer.start()
        try:
            for body in bodies:
                await producer.send_and_wait(settings.topic(topics.REQUESTED), orjson.dumps(body),
                                             key=str(body["request_id"]).encode())
            await producer.send_and_wait(settings.topic(topics.REQUESTED),
                                         b'{"request_id": "canary-bad", "prompt": "'
                                         + prompt_canary.encode(), key=b"canary-bad")
        finally:
            await producer.stop()
        expected = {"canary-ok", "canary-schema", "canary-large", "canary-bad"}
        rows = await wait_for_rows(settings, expected, timeout=30)
        worker.stop()
    log_text = worker.log_path.read_text(errors="replace")
    assert set(rows) == expected
    assert "request_failed" in log_text  # the failure path was exercised and logged
    assert prompt_canary not in log_text
    assert password not in log_text


# --- 4. Redis outage -----------------------------------------------------------------------


async def test_redis_outage_degrades_decisions_and_recovers_without_restart(
    isolated: dict[str, str], workdir: Path,
) -> None:
    outage_s = 10.0
    async with dedicated(workdir / "redis", "redis") as stack:
        url = stack.urls.redis_url
        assert url is not None
        env = {**isolated, "ROUTER_REDIS_URL": url}
        settings = settings_from(env)
        ids = [f"redis-{i}" for i in range(5400)]  # 18 s at 300/s: before, during, after
        with workers() as started:
            worker = WorkerProcess(env, workdir, "w-redis").start()
            started.append(worker)
            await worker.wait_ready()
            publisher = asyncio.create_task(publish(settings, ids, rate_per_s=300))
            await asyncio.sleep(3)
            stopping_at = time.time()
            await stack.stop()
            stopped_at = time.time()
            await asyncio.sleep(outage_s)
            await restart_on_port(stack, port_of(url))
            restarted_at = time.time()
            await publisher
            rows = await wait_for_rows(settings, set(ids), timeout=60)
            assert await ready(worker), worker.tail()
        assert_one_row_each(rows, set(ids))
        decided = await decisions_by_time(settings, set(ids))
    before = [d for t, d in decided if t < stopping_at]
    during = [d for t, d in decided if stopped_at + 0.5 < t < restarted_at]
    after = [(t, d) for t, d in decided if t > restarted_at]
    recovered = next((t for t, d in after if not d), None)
    late = [d for t, d in after if recovered is not None and t > recovered]
    report("redis-outage", outage_s=outage_s, stop_took_s=round(stopped_at - stopping_at, 2),
           before=len(before),
           before_degraded=sum(before), during=len(during), during_degraded=sum(during),
           after=len(after), after_degraded=sum(d for _, d in after),
           recovery_s=None if recovered is None else round(recovered - restarted_at, 2),
           degraded_after_recovery=sum(late))
    assert before
    assert not any(before)
    assert during
    assert all(during)
    assert recovered is not None
    assert recovered - restarted_at < 3.0
    assert not any(late)


# --- 5. Postgres outage --------------------------------------------------------------------


async def test_postgres_outage_sink_retries_with_backoff_and_catches_up_losing_nothing(
    isolated: dict[str, str], workdir: Path,
) -> None:
    outage_s = 10.0  # the issue says 30 s; 10 s exercises the same path in a third of the time
    async with dedicated(workdir / "pg", "postgres") as stack:
        url = stack.urls.database_url
        assert url is not None
        env = {**isolated, "ROUTER_DATABASE_URL": url}
        settings = settings_from(env)
        await migrate(url, settings.database_schema)
        ids = [f"pg-{i}" for i in range(4800)]  # 16 s at 300/s
        with workers() as started:
            worker = WorkerProcess(env, workdir, "w-pg").start()
            started.append(worker)
            await worker.wait_ready()
            publisher = asyncio.create_task(publish(settings, ids, rate_per_s=300))
            await asyncio.sleep(2)
            await stack.stop()
            await asyncio.sleep(outage_s / 2)
            routed_mid = await routed(worker)
            await asyncio.sleep(outage_s / 2)
            during = await worker.metrics()
            await restart_on_port(stack, port_of(url))
            restarted_at = time.monotonic()
            await publisher
            rows = await wait_for_rows(settings, set(ids), timeout=60)
            caught_up_s = time.monotonic() - restarted_at
            after = await worker.metrics()
            routed_end = await routed(worker)
            assert await ready(worker), worker.tail()
    retries_during = metric(during, "router_sink_retries_total")
    lag_during = metric(during, "router_sink_lag")
    report("postgres-outage", outage_s=outage_s, sink_retries_during=retries_during,
           sink_lag_during=lag_during,
           sink_retries_total=metric(after, "router_sink_retries_total"),
           sink_lag_after=metric(after, "router_sink_lag"), routed_mid_outage=routed_mid,
           routed_end=routed_end, caught_up_after_restart_s=round(caught_up_s, 1),
           rows=len(rows))
    assert_one_row_each(rows, set(ids))
    # Backoff doubles from 0.2 s to 5 s: a handful of attempts in 10 s, not a busy loop.
    assert 2 <= retries_during <= 12
    assert lag_during > 0
    assert metric(after, "router_sink_lag") == 0
    assert routed_mid < routed_end  # routing went on while the sink waited


# --- 6. broker restart ---------------------------------------------------------------------


async def publish_tracked(settings: Settings, ids: list[str]) -> dict[str, int]:
    """Publish one request per id; returns the partition each landed on."""
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        topic = settings.topic(topics.REQUESTED)
        futures = [await producer.send(topic, request_bytes(rid, i), key=rid.encode())
                   for i, rid in enumerate(ids)]
        return {rid: meta.partition
                for rid, meta in zip(ids, await asyncio.gather(*futures), strict=True)}
    finally:
        await producer.stop()


async def test_broker_restart_with_topics_reapplied_decides_new_requests_without_worker_restart(
    isolated: dict[str, str], workdir: Path,
) -> None:
    async with dedicated(workdir / "kafka", "kafka") as stack:
        bootstrap = stack.urls.kafka_bootstrap
        assert bootstrap is not None
        env = {**isolated, "ROUTER_KAFKA_BOOTSTRAP": bootstrap}
        settings = settings_from(env)
        await apply_topics(settings)
        first = [f"pre-{i}" for i in range(500)]
        with workers() as started:
            worker = WorkerProcess(env, workdir, "w-broker").start()
            started.append(worker)
            await worker.wait_ready()
            pid = worker.proc.pid if worker.proc else None
            await publish(settings, first)
            assert_one_row_each(await wait_for_rows(settings, set(first), timeout=30), set(first))
            await stack.stop()  # memory only: topics, records and committed offsets vanish
            await asyncio.sleep(2)
            await restart_on_port(stack, port_of(bootstrap))
            await apply_topics(settings)
            restarted_at = time.monotonic()
            # Probe until decisions flow on every partition again; a probe published into the
            # window described in the module's limitation note may be skipped, so count them.
            probes: dict[str, int] = {}
            live: set[int] = set()
            for round_ in range(15):
                ids = [f"probe-{round_}-{i}" for i in range(200)]
                landed = await publish_tracked(settings, ids)
                probes.update(landed)
                await asyncio.sleep(1.0)
                decided = set(await row_ids(settings))
                live |= {part for rid, part in landed.items() if rid in decided}
                if len(live) == settings.topic_partitions:
                    break
            recovered_s = time.monotonic() - restarted_at
            after = [f"post-{i}" for i in range(500)]
            await publish(settings, after)
            rows = await wait_for_rows(settings, set(first) | set(after), timeout=30)
            decided = set(await row_ids(settings))
            alive = worker.proc is not None and worker.proc.poll() is None
            same_pid = worker.proc is not None and worker.proc.pid == pid
    skipped = Counter(part for rid, part in probes.items() if rid not in decided)
    report("broker-restart", recovered_s=round(recovered_s, 1), worker_alive=alive,
           probes=len(probes), probes_skipped=sum(skipped.values()),
           skipped_by_partition=dict(skipped), post_rows=len(set(after) & decided))
    assert alive
    assert same_pid
    assert len(live) == settings.topic_partitions, f"partitions decided again: {live}"
    assert_one_row_each([r for r in rows if not r.startswith("probe-")],
                        set(first) | set(after))
