"""`router-worker replay-bench`: shadow replay throughput and memory on synthetic traffic."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from itertools import cycle, islice
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from router_worker.bench import load_prompts
from router_worker.classify.engine import Engine
from router_worker.kafka import client_options, producer_options
from router_worker.replay import ReplayRange, replay
from router_worker.settings import Settings

_CHUNK = 20_000


def rss_mb() -> float:
    """Resident set size of this process (Linux /proc), in MB."""
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def _make_topic(settings: Settings, name: str) -> None:
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, settings.topic_partitions, 1)])
    finally:
        await admin.close()


async def _drop_topic(settings: Settings, name: str) -> None:
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10000)
    await admin.start()
    try:
        await admin.delete_topics([name])
    except Exception:  # a throwaway topic left behind is harmless; say nothing more
        pass
    finally:
        await admin.close()


async def _generate(settings: Settings, topic: str, prompts: list[str], n: int) -> float:
    """Publish n synthetic requests in chunks (bounded memory); returns seconds taken."""
    producer = AIOKafkaProducer(**{**producer_options(settings), "linger_ms": 20,
                                   "max_batch_size": 512 * 1024})
    await producer.start()
    started = time.monotonic()
    try:
        source = cycle(prompts)
        for base in range(0, n, _CHUNK):
            futures = []
            for i in range(base, min(base + _CHUNK, n)):
                rid = f"rb-{i}"
                body = {"request_id": rid, "tenant_id": "bench", "prompt": next(source)}
                futures.append(await producer.send(topic, orjson.dumps(body), key=rid.encode()))
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.monotonic() - started


def _classify_rate(engine: Engine | None, prompts: list[str], batch_size: int,
                   n: int) -> float | None:
    if engine is None:
        return None
    texts = list(islice(cycle(prompts), n))
    engine.classify(texts[:batch_size])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        engine.classify(texts[i:i + batch_size])
    return len(texts) / (time.perf_counter() - started)


def run_replay_bench(settings: Settings, engine: Engine | None, n: int,
                     batch_size: int) -> dict[str, Any]:
    """Generate n requests into a throwaway topic, replay them, compare with the raw engine."""
    prompts = load_prompts()
    topic = settings.topic(f"replay-bench-{uuid.uuid4().hex[:8]}")
    asyncio.run(_make_topic(settings, topic))
    try:
        produce_s = asyncio.run(_generate(settings, topic, prompts, n))
        samples: list[tuple[int, float]] = []

        def sample(stats: Any) -> None:
            samples.append((stats.replayed, rss_mb()))

        rss_start = rss_mb()
        report = asyncio.run(replay(settings, ReplayRange(topic), engine, join=False,
                                    batch_size=batch_size, progress=sample,
                                    progress_every_s=5.0))
        rss_end = rss_mb()
    finally:
        asyncio.run(_drop_topic(settings, topic))
    replayed_per_s = report["throughput"]["replayed_per_s"] or 0.0
    classify_per_s = _classify_rate(engine, prompts, batch_size, min(n, 100_000))
    return {
        "n": n,
        "replayed": report["requests_replayed"],
        "engine": engine.version if engine is not None else "keyword",
        "batch_size": batch_size,
        "produce_s": round(produce_s, 2),
        "replay_elapsed_s": report["throughput"]["elapsed_s"],
        "replayed_per_s": replayed_per_s,
        "classify_per_s": round(classify_per_s, 1) if classify_per_s else None,
        "ratio": round(replayed_per_s / classify_per_s, 3) if classify_per_s else None,
        "rss_mb_start": rss_start,
        "rss_mb_end": rss_end,
        "rss_samples": samples[:: max(1, len(samples) // 20)],
    }
