"""The embedded broker's own latency floor: a bare aiokafka hop at a fixed rate, over time.

No router code runs here: a producer publishes `--rate` records/s to topic `a`, one group
consumer moves each fetch to topic `b` and commits, and a reader of `b` timestamps arrivals.
Every `--every` seconds it prints the broker's CPU use and the hop's p50/p99 over that window,
then one JSON object. It shows that the embedded broker (Tansu, memory storage) spends more
per record the more records a topic holds, so its latency at a steady rate grows with time;
`--preload N` first writes N records to an unrelated topic, to show that other topics' data
does not matter.

`--fetch-cost N` measures why instead: it stores N one-record batches in a partition, in
three steps, and after each step reads the partition's last record 300 times; the broker's
CPU per fetch grows with the batches the partition holds.

Usage:
    python scripts/broker_floor.py --rate 1000 --seconds 20 [--preload 40000] [--out F.json]
    python scripts/broker_floor.py --fetch-cost 9000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from router_worker.bench import bare_hop, cpu_seconds, percentile
from router_worker.embedded import EmbeddedStack

_PAYLOAD = b"x" * 300  # about the size of a routing request


async def _create(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        await admin.close()


async def fetch_cost(batches: int, fetches: int = 300) -> dict[str, Any]:
    """Broker CPU and wall time per fetch of a partition's tail as the partition fills."""
    with tempfile.TemporaryDirectory() as run_dir:
        stack = EmbeddedStack(Path(run_dir), kafka=True, redis=False, postgres=False)
        bootstrap = (await stack.start()).env()["ROUTER_KAFKA_BOOTSTRAP"]
        broker_pid = stack.pids["kafka"]
        await _create(bootstrap, ["c"], 1)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=5,
                                  enable_auto_commit=False)
        await asyncio.gather(producer.start(), reader.start())
        tp = TopicPartition("c", 0)
        reader.assign([tp])
        steps: list[dict[str, float]] = []
        try:
            for step in range(1, 4):
                for _ in range(batches // 3):
                    await producer.send_and_wait("c", _PAYLOAD)  # one batch each
                stored = step * (batches // 3)
                cpu_before, start = cpu_seconds(broker_pid), time.monotonic()
                for _ in range(fetches):
                    reader.seek(tp, stored - 1)
                    await reader.getmany(tp, timeout_ms=1000)
                steps.append({
                    "batches_in_partition": stored,
                    "broker_cpu_ms_per_fetch": round(
                        (cpu_seconds(broker_pid) - cpu_before) / fetches * 1000, 3),
                    "fetch_ms": round((time.monotonic() - start) / fetches * 1000, 3),
                })
                print(json.dumps(steps[-1]), file=sys.stderr, flush=True)
        finally:
            await asyncio.gather(producer.stop(), reader.stop())
            await stack.stop()
    return {"date": date.today().isoformat(), "fetches_per_step": fetches, "steps": steps}


async def measure(
    rate: float, seconds: float, partitions: int, preload: int, every: float, fetch_wait_ms: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as run_dir:
        stack = EmbeddedStack(Path(run_dir), kafka=True, redis=False, postgres=False)
        bootstrap = (await stack.start()).env()["ROUTER_KAFKA_BOOTSTRAP"]
        try:
            return await _hop(bootstrap, stack.pids["kafka"], rate, seconds, partitions,
                              preload, every, fetch_wait_ms)
        finally:
            await stack.stop()


async def _hop(
    bootstrap: str, broker_pid: int, rate: float, seconds: float, partitions: int,
    preload: int, every: float, fetch_wait_ms: int,
) -> dict[str, Any]:
    await _create(bootstrap, ["a", "b", "other"], partitions)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    mover = AIOKafkaConsumer(
        "a", bootstrap_servers=bootstrap, group_id="floor", fetch_max_wait_ms=fetch_wait_ms,
        auto_offset_reset="earliest", enable_auto_commit=False,
        session_timeout_ms=2000, heartbeat_interval_ms=500,
    )
    reader = AIOKafkaConsumer(
        "b", bootstrap_servers=bootstrap, group_id=None, fetch_max_wait_ms=fetch_wait_ms,
        auto_offset_reset="earliest",
    )
    await asyncio.gather(producer.start(), mover.start(), reader.start())
    sent: dict[bytes, float] = {}
    arrived: list[tuple[float, float]] = []  # (arrival time, latency ms)

    async def move() -> None:
        while True:
            await bare_hop(mover, producer, "b")

    async def read() -> None:
        while True:
            batches = await reader.getmany(timeout_ms=50, max_records=10000)
            now = time.monotonic()
            for records in batches.values():
                for r in records:
                    arrived.append((now, (now - sent[r.key]) * 1000))

    tasks = [asyncio.create_task(move()), asyncio.create_task(read())]
    try:
        if preload:
            futures = [await producer.send("other", _PAYLOAD, key=b"p%d" % i)
                       for i in range(preload)]
            await asyncio.gather(*futures)
        while not mover.assignment():
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        samples: list[dict[str, float]] = []
        start = window = time.monotonic()
        cpu_before, index = cpu_seconds(broker_pid), 0
        while time.monotonic() - start < seconds:
            due = int((time.monotonic() - start) * rate) + 1
            futures = []
            while index < due:
                key = b"k%d" % index
                sent[key] = time.monotonic()
                futures.append(await producer.send("a", _PAYLOAD, key=key))
                index += 1
            await asyncio.gather(*futures)
            await asyncio.sleep(0.005)
            now = time.monotonic()
            if now - window >= every:
                cpu_now = cpu_seconds(broker_pid)
                recent = [ms for t, ms in arrived if t >= window]
                sample = {"t_s": round(now - start, 1),
                          "broker_cores": round((cpu_now - cpu_before) / (now - window), 2),
                          "records_in_topic": index, "p50_ms": percentile(recent, 50),
                          "p99_ms": percentile(recent, 99)}
                samples.append(sample)
                print(json.dumps(sample), file=sys.stderr, flush=True)
                cpu_before, window = cpu_now, now
        deadline = time.monotonic() + 10
        while len(arrived) < index and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(producer.stop(), mover.stop(), reader.stop())
    latencies = [ms for _, ms in arrived]
    return {
        "date": date.today().isoformat(),
        "rate": rate, "seconds": seconds, "partitions": partitions, "preload_other": preload,
        "fetch_max_wait_ms": fetch_wait_ms, "records": len(latencies),
        "latency_ms": {f"p{q}": percentile(latencies, q) for q in (50, 95, 99)},
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--preload", type=int, default=0, help="records first written elsewhere")
    parser.add_argument("--every", type=float, default=2.0, help="seconds per sample")
    parser.add_argument("--fetch-wait-ms", type=int, default=10)
    parser.add_argument("--fetch-cost", type=int, default=0, metavar="N",
                        help="instead: broker CPU per fetch with up to N batches stored")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = (
        asyncio.run(fetch_cost(args.fetch_cost)) if args.fetch_cost > 0
        else asyncio.run(measure(args.rate, args.seconds, args.partitions, args.preload,
                                 args.every, args.fetch_wait_ms))
    )
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
