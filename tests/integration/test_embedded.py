"""The embedded broker, Redis and Postgres start, serve, stop, and are chosen only when needed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from router_worker.embedded import (
    EmbeddedStack,
    StackPlan,
    StackUrls,
    is_reachable_kafka,
    is_reachable_postgres,
    is_reachable_redis,
    resolve_stack,
)
from router_worker.errors import EmbeddedStackError

pytestmark = pytest.mark.integration

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
CLOSED_REDIS = "redis://127.0.0.1:1/0"
CLOSED_POSTGRES = "postgresql://postgres@127.0.0.1:1/test"
CLOSED_KAFKA = "127.0.0.1:1"
CLI = [sys.executable, "-m", "router_worker.embedded"]


def _alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _descendants(root: int) -> set[int]:
    """`root` and every live process below it (postgres backends are in their own sessions)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if _alive(pid):
            found.add(pid)
        todo.extend(children.get(pid, []))
    return found


@pytest.fixture(scope="module")
async def full_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedStack]:
    async with EmbeddedStack(
        tmp_path_factory.mktemp("stack"), kafka=True, redis=True, postgres=True
    ) as stack:
        yield stack


async def test_full_stack_gives_urls_for_all_three_services(full_stack: EmbeddedStack) -> None:
    urls = full_stack.urls
    assert urls.kafka_bootstrap is not None
    assert urls.redis_url is not None
    assert urls.database_url is not None
    assert set(urls.env()) == {"ROUTER_KAFKA_BOOTSTRAP", "ROUTER_REDIS_URL", "ROUTER_DATABASE_URL"}
    assert set(full_stack.timings) == {"kafka", "redis", "postgres"}


async def test_embedded_broker_round_trips_a_record(full_stack: EmbeddedStack) -> None:
    bootstrap = full_stack.urls.kafka_bootstrap
    topic = f"test-embedded-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"request-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=10)
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"request-1", b"hello")


async def test_embedded_redis_sets_and_gets(full_stack: EmbeddedStack) -> None:
    assert full_stack.urls.redis_url is not None
    client = aioredis.Redis.from_url(full_stack.urls.redis_url)
    try:
        await client.set("test-embedded:key", "value")
        assert await client.get("test-embedded:key") == b"value"
    finally:
        await client.aclose()


async def test_embedded_postgres_creates_inserts_and_selects(full_stack: EmbeddedStack) -> None:
    conn = await asyncpg.connect(full_stack.urls.database_url)
    try:
        await conn.execute("create table test_embedded (id text primary key, n int)")
        await conn.executemany("insert into test_embedded values ($1, $2)", [("a", 1), ("b", 2)])
        assert await conn.fetchval("select sum(n) from test_embedded") == 3
    finally:
        await conn.close()


async def test_stop_kills_every_process_it_started(tmp_path: Path) -> None:
    stack = EmbeddedStack(tmp_path, kafka=True, redis=True, postgres=True)
    await stack.start()
    conn = await asyncpg.connect(stack.urls.database_url)  # a backend the stop must end too
    started = {pid for leader in stack.pids.values() for pid in _descendants(leader)}
    assert len(started) > 3  # postgres runs a postmaster plus helper processes

    await stack.stop()

    assert [pid for pid in started if _alive(pid)] == []
    assert stack.pids == {}
    await stack.stop()  # idempotent
    conn.terminate()


async def test_stop_leaves_services_it_did_not_start_alone(tmp_path: Path) -> None:
    async with EmbeddedStack(tmp_path / "other", kafka=False, redis=True, postgres=False) as other:
        stack = EmbeddedStack(tmp_path / "mine", kafka=False, redis=True, postgres=False)
        await stack.start()
        assert stack.pids.keys() == {"redis"}
        await stack.stop()
        assert other.urls.redis_url is not None
        assert await is_reachable_redis(other.urls.redis_url)
        assert _alive(other.pids["redis"])


async def test_postgres_data_survives_a_restart_in_the_same_run_dir(tmp_path: Path) -> None:
    async with EmbeddedStack(tmp_path, kafka=False, redis=False, postgres=True) as stack:
        conn = await asyncpg.connect(stack.urls.database_url)
        await conn.execute("create table kept (n int); insert into kept values (42)")
        await conn.close()
    async with EmbeddedStack(tmp_path, kafka=False, redis=False, postgres=True) as stack:
        conn = await asyncpg.connect(stack.urls.database_url)
        assert await conn.fetchval("select n from kept") == 42
        await conn.close()


async def test_failed_start_names_the_service_and_its_log_and_stops_the_rest(
    tmp_path: Path,
) -> None:
    junk = tmp_path / "postgres"  # a non-empty data directory without PG_VERSION: initdb fails
    junk.mkdir()
    (junk / "junk").write_text("not a database")
    stack = EmbeddedStack(tmp_path, kafka=False, redis=True, postgres=True)

    with pytest.raises(EmbeddedStackError, match=r"embedded postgres initdb failed") as info:
        await stack.start()

    assert "postgres.log" in str(info.value)
    assert "not empty" in str(info.value)
    assert stack.pids == {}


async def test_unset_variables_are_embedded() -> None:
    for probe in (False, True):
        assert await resolve_stack({}, probe=probe) == StackPlan(True, True, True)


async def test_set_variables_are_trusted_without_probe() -> None:
    env = {
        "ROUTER_KAFKA_BOOTSTRAP": CLOSED_KAFKA,
        "ROUTER_REDIS_URL": CLOSED_REDIS,
        "ROUTER_DATABASE_URL": CLOSED_POSTGRES,
    }
    assert await resolve_stack(env, probe=False) == StackPlan(False, False, False)


async def test_unreachable_configured_services_are_embedded_when_probing() -> None:
    env = {
        "ROUTER_KAFKA_BOOTSTRAP": CLOSED_KAFKA,
        "ROUTER_REDIS_URL": CLOSED_REDIS,
        "ROUTER_DATABASE_URL": CLOSED_POSTGRES,
    }
    began = time.perf_counter()
    assert await resolve_stack(env, probe=True) == StackPlan(True, True, True)
    assert time.perf_counter() - began < 2.0  # probes are short and concurrent


async def test_reachable_configured_services_are_not_embedded(full_stack: EmbeddedStack) -> None:
    env = full_stack.urls.env()
    assert await resolve_stack(env, probe=True) == StackPlan(False, False, False)


async def test_the_machines_own_redis_and_postgres_are_not_embedded() -> None:
    if not (await is_reachable_redis(LOCAL_REDIS) and await is_reachable_postgres(LOCAL_POSTGRES)):
        pytest.skip("no Redis on 127.0.0.1:6379 or Postgres on 127.0.0.1:5432/test")
    env = {"ROUTER_REDIS_URL": LOCAL_REDIS, "ROUTER_DATABASE_URL": LOCAL_POSTGRES}
    assert await resolve_stack(env, probe=True) == StackPlan(True, False, False)


async def test_probes_say_no_for_closed_ports() -> None:
    assert not await is_reachable_kafka(CLOSED_KAFKA)
    assert not await is_reachable_redis(CLOSED_REDIS)
    assert not await is_reachable_postgres(CLOSED_POSTGRES)


async def test_embedded_redis_and_postgres_start_within_five_seconds(tmp_path: Path) -> None:
    began = time.perf_counter()
    async with EmbeddedStack(tmp_path, kafka=False, redis=True, postgres=True) as stack:
        elapsed = time.perf_counter() - began
    print(f"embedded redis+postgres ready in {elapsed:.3f} s, per service {stack.timings}")
    assert elapsed < 5.0


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


async def test_command_line_writes_env_file_and_stops_on_sigterm(tmp_path: Path) -> None:
    env_file = tmp_path / "stack.env"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    env["ROUTER_KAFKA_BOOTSTRAP"] = "broker.example:9092"
    proc = await asyncio.to_thread(
        subprocess.Popen, [*CLI, "--run-dir", str(tmp_path), "--env-file", str(env_file)], env=env
    )
    try:
        await asyncio.to_thread(_wait_for_file, env_file, proc)
        values = _read_env_file(env_file)
        assert values["ROUTER_KAFKA_BOOTSTRAP"] == "broker.example:9092"  # configured: kept
        assert await is_reachable_redis(values["ROUTER_REDIS_URL"])
        assert await is_reachable_postgres(values["ROUTER_DATABASE_URL"])
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 15)
    assert code == 0
    assert not env_file.exists()
    assert not await is_reachable_redis(values["ROUTER_REDIS_URL"])


async def test_command_line_runs_a_command_with_the_urls(tmp_path: Path) -> None:
    show = "import os; print(os.environ['ROUTER_REDIS_URL'])"
    result = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "--run-dir", str(tmp_path), "--services", "redis", "--", sys.executable, "-c", show],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("redis://127.0.0.1:")


async def test_services_die_with_a_killed_parent(tmp_path: Path) -> None:
    env_file = tmp_path / "stack.env"
    argv = [*CLI, "--run-dir", str(tmp_path), "--env-file", str(env_file)]
    proc = await asyncio.to_thread(subprocess.Popen, [*argv, "--services", "redis,postgres"])
    await asyncio.to_thread(_wait_for_file, env_file, proc)
    values = _read_env_file(env_file)

    proc.kill()  # no cleanup code runs: only the parent-death signal can stop the children
    await asyncio.to_thread(proc.wait)

    deadline = time.monotonic() + 10
    while await is_reachable_redis(values["ROUTER_REDIS_URL"]) or await is_reachable_postgres(
        values["ROUTER_DATABASE_URL"]
    ):
        assert time.monotonic() < deadline, "a service outlived its parent"
        await asyncio.sleep(0.1)


def test_stack_urls_env_names_only_started_services() -> None:
    urls = StackUrls(redis_url="redis://127.0.0.1:1/0")
    assert urls.env() == {"ROUTER_REDIS_URL": "redis://127.0.0.1:1/0"}
