"""The sink's cost per row: drain a backlog of completed events into Postgres, nothing else.

It publishes `--events` completed events (the shape the route agent emits) to a fresh topic on
the embedded broker, starts `router-worker sink` on them, and from the first row to the last
reads the CPU time of the sink process and of every local `postgres` process. One JSON object:
per run the sink's and Postgres's CPU microseconds per row and rows/s, then their medians.
The route worker, Redis and the load generator do not run, so the figures are the sink's own
(the full `router-worker bench` reports the sink's cores beside everything else).

Run it from the checkout whose sink you measure, with that checkout first on the path: the sink
process imports `router_worker` from the working directory, and the migrations come from the
same place, so two checkouts can be compared with one virtualenv.

Usage:
    PYTHONPATH=. python scripts/sink_drain.py [--events 40000] [--runs 3] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from router_worker import topics
from router_worker.bench import Phase, cpu_seconds, worker_env
from router_worker.embedded import EmbeddedStack, resolve_stack
from router_worker.kafka import producer_options
from router_worker.store.connect import connect
from router_worker.store.migrate import migrate

# A decision as the route agent writes it (keyword tier, no prompt stored).
EVENT: dict[str, Any] = {
    "tenant_id": "bench",
    "decision": {
        "model": "gpt-4.1-mini", "provider": "openai",
        "fallbacks": ["claude-haiku-3.5", "llama-3.1-8b"],
        "alternatives": [{"model": "claude-haiku-3.5", "score": 0.71},
                         {"model": "llama-3.1-8b", "score": 0.6}],
        "policy": "balanced", "category": "code", "complexity": "simple", "confidence": 0.8123,
        "tier": "keyword", "reason": "code/simple -> policy balanced; first choice eligible",
        "estimated_cost_usd": 0.000123,
    },
    "classifier_version": "keyword-abcdef12", "degraded": [],
    "timings_ms": {"enrich": 1.2, "classify": 0.5, "queue": 3.2, "total": 4.9},
    "created_at": "2026-11-26T09:00:00.100000+00:00",
    "decided_at": "2026-11-26T09:00:00.123456+00:00",
}


def postgres_cpu_seconds() -> float:
    """CPU time of every local process named `postgres` (the server and its backends)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() == "postgres":
                total += cpu_seconds(int(stat.parent.name))
        except (OSError, ValueError):
            continue  # a backend that ended meanwhile
    return total


async def _publish(phase: Phase, events: int) -> None:
    producer = AIOKafkaProducer(**{**producer_options(phase.settings), "linger_ms": 5})
    await producer.start()
    try:
        futures = []
        for i in range(events):
            rid = f"sink-{i}"
            value = orjson.dumps({**EVENT, "request_id": rid})
            futures.append(await producer.send(
                phase.settings.topic(topics.COMPLETED), value, key=rid.encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def drain(base: dict[str, str], events: int, run_dir: Path) -> dict[str, float]:
    """One run on its own topics and schema: CPU per row from the first row to the last."""
    phase = await Phase.create(base, "sink" + uuid.uuid4().hex[:6], "d")
    await migrate(phase.dsn, phase.tag)
    # One connection polls the count: a connection per poll would start a Postgres backend
    # every few milliseconds and charge it to the rows.
    counter = await connect(phase.dsn, phase.tag)

    async def count_rows() -> int:
        return int(await counter.fetchval("SELECT count(*) FROM routing_events"))

    try:
        await _publish(phase, events)
        with (run_dir / "sink.log").open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "router_worker", "sink"],
                                    env=worker_env(phase.env, "keyword"), stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while (first := await count_rows()) == 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the sink wrote nothing (see {run_dir / 'sink.log'})")
                await asyncio.sleep(0.01)
            sink0, pg0, t0 = cpu_seconds(proc.pid), postgres_cpu_seconds(), time.monotonic()
            while await count_rows() < events:
                if time.monotonic() - t0 > 300:
                    raise RuntimeError("the sink did not finish within 300 s")
                await asyncio.sleep(0.02)
            sink1, pg1, t1 = cpu_seconds(proc.pid), postgres_cpu_seconds(), time.monotonic()
        finally:
            proc.terminate()
            proc.wait(30)
        rows = events - first
        return {
            "sink_cpu_us_per_row": round((sink1 - sink0) / rows * 1e6, 1),
            "postgres_cpu_us_per_row": round((pg1 - pg0) / rows * 1e6, 1),
            "rows_per_s": round(rows / (t1 - t0)),
        }
    finally:
        await counter.close()
        await phase.cleanup()


async def measure(events: int, runs: int) -> dict[str, Any]:
    """`runs` drains on one embedded broker; every run and the medians."""
    base = {
        "ROUTER_REDIS_URL": os.environ.get("ROUTER_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "ROUTER_DATABASE_URL": os.environ.get(
            "ROUTER_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        "ROUTER_TOPIC_PARTITIONS": "1",
    }
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        plan = await resolve_stack(base, probe=True)
        stack = EmbeddedStack(run_dir, kafka=plan.kafka, redis=plan.redis,
                              postgres=plan.postgres)
        base = {**base, **(await stack.start()).env()}
        results = []
        try:
            for _ in range(runs):
                results.append(await drain(base, events, run_dir))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        finally:
            await stack.stop()
    return {
        "date": date.today().isoformat(),
        "events": events,
        "runs": results,
        "median": {key: round(statistics.median(r[key] for r in results), 1)
                   for key in results[0]},
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = json.dumps(asyncio.run(measure(args.events, args.runs)), indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
