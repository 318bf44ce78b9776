"""Record traffic, export a training set, train a candidate, replay it in shadow (nothing
published, no offsets committed), promote it, and see a running worker stamp the new version."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from router_worker import topics
from router_worker.classify.artifacts import current_version, read_meta
from router_worker.client import RoutingClient
from router_worker.kafka import consumer_options, producer_options
from router_worker.settings import DEFAULT_CONFIG, Settings
from tests.conftest import settings_from
from tests.integration.workers import WorkerProcess, wait_rows

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STATIC_MODEL = REPO / "models" / "static-minilm"
N = 2000
TRAIN_ON = 600


def _corpus(n: int) -> list[dict[str, Any]]:
    records = []
    for path in sorted((REPO / "data" / "prompts").glob("*.jsonl")):
        records += [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    records.sort(key=lambda r: hash(r["prompt"]) % 7919)  # interleave the categories
    return records[:n]


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    done = subprocess.run([sys.executable, "-m", "router_worker", *args], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout.decode()


async def _publish(settings: Settings, topic: str, bodies: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        futures = [await producer.send(topic, orjson.dumps(b), key=b["request_id"].encode())
                   for b in bodies]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _count_records(settings: Settings, names: list[str], idle_s: float = 1.5) -> int:
    """Records on the topics, read from the start with no group (end offsets are not trusted)."""
    consumer = AIOKafkaConsumer(**consumer_options(settings), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        await consumer.topics()
        parts = [TopicPartition(t, p) for t in names
                 for p in consumer.partitions_for_topic(t) or ()]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        count, last = 0, time.monotonic()
        while time.monotonic() - last < idle_s:
            got = await consumer.getmany(timeout_ms=200, max_records=10000)
            n = sum(len(r) for r in got.values())
            if n:
                count, last = count + n, time.monotonic()
        return count
    finally:
        await consumer.stop()


async def _group_offsets(settings: Settings, group: str) -> dict[tuple[str, int], int | None]:
    """The group's committed offsets (OffsetFetch for named partitions: the embedded broker's
    all-partitions answer does not decode). The consumer never joins the group nor commits."""
    consumer = AIOKafkaConsumer(**consumer_options(settings), group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        topic = settings.topic(topics.REQUESTED)
        await consumer.topics()
        return {(topic, p): await consumer.committed(TopicPartition(topic, p))
                for p in sorted(consumer.partitions_for_topic(topic) or ())}
    finally:
        await consumer.stop()


async def _wait_outcomes(settings: Settings, expected: int, timeout: float = 30) -> int:
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        deadline, count = time.monotonic() + timeout, 0
        while time.monotonic() < deadline and count < expected:
            count = await conn.fetchval(
                f'SELECT count(*) FROM "{settings.database_schema}".routing_outcomes')
            await asyncio.sleep(0.3)
        return int(count)
    finally:
        await conn.close()


@pytest.mark.skipif(not STATIC_MODEL.is_dir(), reason="needs the static encoder (make model)")
async def test_record_export_train_replay_in_shadow_then_promote(
    isolated: dict[str, str], workdir: Path,
) -> None:
    # The live classifier: trained here on prompts that are not part of the recorded traffic,
    # so the test does not depend on (or touch) the repository's artifacts.
    corpus = _corpus(N + TRAIN_ON)
    root = workdir / "artifacts"
    baseline = workdir / "baseline.jsonl"
    baseline.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in corpus[N:]))
    base_env = {**isolated, "ROUTER_STATIC_MODEL": str(STATIC_MODEL)}
    _cli(base_env, "train", "--no-encoder-head", "--data", str(baseline), "--out", str(root),
         "--holdout", str(workdir / "none"), timeout=300)
    live_version = current_version(root)
    assert live_version is not None
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["tenants"]["learner"] = {"store_prompts": True}
    (workdir / "routing.yaml").write_text(yaml.safe_dump(config))
    env = {**isolated, "ROUTER_ENGINE": "cpu", "ROUTER_ARTIFACT": str(root),
           "ROUTER_STATIC_MODEL": str(STATIC_MODEL), "ROUTER_ARTIFACT_POLL_S": "1.0",
           "ROUTER_CONFIG": str(workdir / "routing.yaml")}
    settings = settings_from(env)
    corpus = corpus[:N]
    worker = WorkerProcess(env, workdir).start()
    try:
        await worker.wait_ready(timeout=60)
        # 1. record 2,000 requests through the pipeline, and what callers saw afterwards
        await _publish(settings, settings.topic(topics.REQUESTED), [
            {"request_id": f"r{i}", "tenant_id": "learner", "prompt": r["prompt"]}
            for i, r in enumerate(corpus)])
        assert await wait_rows(settings.database_url.get_secret_value(),
                               settings.database_schema, N, timeout=60) == N, worker.tail()
        await _publish(settings, settings.topic(topics.OUTCOME), [
            {"request_id": f"r{i}", "tenant_id": "learner", "model": "gpt-4o-mini",
             "success": True, "latency_ms": 100.0, "label": r["category"]}
            for i, r in enumerate(corpus)])
        assert await _wait_outcomes(settings, N) == N, worker.tail()

        # 2. export the recorded prompts + labels; 3. train a candidate on the export
        export = workdir / "export.jsonl"
        _cli(env, "dataset", "export", "--from-postgres", "--out", str(export))
        lines = [orjson.loads(x) for x in export.read_bytes().splitlines()]
        assert len(lines) >= N * 0.9  # what dedup of the normalised prompts leaves
        assert {x["source"] for x in lines} == {"label"}
        # The head's hyper-parameter search dominates; a slice of the export keeps it short.
        subset = workdir / "subset.jsonl"
        subset.write_bytes(b"\n".join(export.read_bytes().splitlines()[:TRAIN_ON]) + b"\n")
        _cli(env, "train", "--no-encoder-head", "--data", str(subset),
             "--out", str(workdir / "candidates"), "--holdout", str(workdir / "none"),
             timeout=300)
        candidate = next(p for p in (workdir / "candidates").iterdir() if p.name.startswith("cpu-"))
        assert read_meta(candidate).metrics["test"]["macro_f1"] > 0.5

        # 4. replay in shadow: totals match, topics and the live group's offsets untouched
        live_topics = [settings.topic(t) for t in
                       (topics.REQUESTED, topics.COMPLETED, topics.FAILED)]
        before = await _count_records(settings, live_topics)
        offsets_before = await _group_offsets(settings, settings.app_id)
        report_path = workdir / "report.json"
        _cli(env, "replay", "--topic", topics.REQUESTED, "--from-offset", "0",
             "--artifact", str(candidate), "--out", str(report_path), "--idle-s", "1.5")
        report = orjson.loads(report_path.read_bytes())
        assert report["requests_replayed"] == N
        assert report["joined_with_recorded"] == N
        assert report["compared_decisions"] == N
        assert report["candidate_classifier_version"] == candidate.name
        assert report["recorded_classifier_versions"] == {live_version: N}
        assert 0.5 < report["agreement"]["category"] <= 1.0
        assert sum(sum(row.values()) for row in report["confusion"].values()) == N
        assert await _count_records(settings, live_topics) == before == 2 * N
        assert await _group_offsets(settings, settings.app_id) == offsets_before
        assert sum(o or 0 for o in offsets_before.values()) == N

        # 5. promote: the running worker stamps the new version within 5 s, no restart
        _cli(env, "classifier", "promote", str(candidate), "--force")
        promoted_at = time.monotonic()
        async with RoutingClient(settings) as client:
            version = None
            while time.monotonic() - promoted_at < 5.0:
                reply = await client.route("hello there", tenant="learner")
                version = reply.event["classifier_version"]
                if version == candidate.name:
                    break
                await asyncio.sleep(0.1)
        assert version == candidate.name, worker.tail()
        assert reply.event["prompt"] == "hello there"  # store_prompts tenant
    finally:
        worker.stop()


async def test_export_takes_prompts_from_the_requested_topic_for_tenants_that_do_not_store_them(
    isolated: dict[str, str], workdir: Path,
) -> None:
    """Tenants without `store_prompts` leave no prompt in Postgres; `--from-topic` joins the
    prompt back from routing.requested.v1 by request_id, within retention."""
    corpus = _corpus(30)
    settings = settings_from(isolated)
    worker = WorkerProcess(isolated, workdir).start()
    try:
        await worker.wait_ready()
        await _publish(settings, settings.topic(topics.REQUESTED), [
            {"request_id": f"p{i}", "tenant_id": "private", "prompt": r["prompt"]}
            for i, r in enumerate(corpus)])
        assert await wait_rows(settings.database_url.get_secret_value(),
                               settings.database_schema, 30) == 30, worker.tail()
        await _publish(settings, settings.topic(topics.OUTCOME), [
            {"request_id": f"p{i}", "tenant_id": "private", "model": "gpt-4o-mini",
             "success": True, "latency_ms": 50.0, "label": r["category"]}
            for i, r in enumerate(corpus)])
        assert await _wait_outcomes(settings, 30) == 30, worker.tail()
    finally:
        worker.stop()
    without = workdir / "without.jsonl"
    _cli(isolated, "dataset", "export", "--from-postgres", "--out", str(without))
    assert without.read_bytes().strip() == b""  # no prompt was stored for this tenant
    joined = workdir / "joined.jsonl"
    _cli(isolated, "dataset", "export", "--from-postgres", "--from-topic", "--out", str(joined))
    lines = [orjson.loads(x) for x in joined.read_bytes().splitlines() if x.strip()]
    expected = {r["prompt"]: r["category"] for r in corpus}
    assert len(lines) == len(expected)
    assert {line["prompt"]: line["category"] for line in lines} == expected
