"""The route stage's own cost per request: `Router.route` on full micro-batches, nothing else.

It builds the route agent's runtime as a worker does (config, engine, cascade, Redis enricher),
then routes `--batches` batches of `--batch` bench-style requests (a corpus prompt with a unique
suffix, so nothing repeats) in this process, with no broker, sink or load generator running:
the figure is validation, enrichment (one real Redis round trip a batch), classification and
decision, per request. The first batches warm the caches and are not counted. One JSON object:
per run the CPU and wall microseconds a request, then their medians.

Compare two checkouts with one virtualenv by putting each first on the path, alternating runs:
the machine's speed drifts, so only side-by-side figures compare.

Usage:
    PYTHONPATH=. python scripts/route_cost.py [--engine keyword|cpu] [--runs 3] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from router_worker.agents.runtime import RouteRuntime
from router_worker.bench import UNIQUE_PROMPTS, _prompt, load_prompts
from router_worker.enrich import drop_keys
from router_worker.metrics import create_metrics
from router_worker.settings import Settings
from router_worker.validate import Inbound

WARM_BATCHES = 5


def _batches(tag: str, prompts: list[str], batch: int, count: int) -> list[list[Inbound]]:
    out: list[list[Inbound]] = []
    for b in range(count):
        records = []
        for i in range(b * batch, (b + 1) * batch):
            rid = f"{tag}-{i}"
            body = {"request_id": rid, "tenant_id": "bench", "prompt": _prompt(prompts, i, rid)}
            records.append(Inbound(orjson.dumps(body), rid.encode(), (), "requested", 0, i,
                                   time.time() * 1000))
        out.append(records)
    return out


async def one_run(engine: str, batch: int, batches: int) -> dict[str, float]:
    """Route `batches` batches after the warm-up; microseconds a request."""
    tag = f"cost{uuid.uuid4().hex[:6]}"
    settings = Settings(engine=engine, redis_prefix=f"{tag}:", log_level="warning")
    runtime = await RouteRuntime.start(settings, create_metrics(CollectorRegistry()))
    work = _batches(tag, load_prompts(), batch, WARM_BATCHES + batches)
    try:
        for records in work[:WARM_BATCHES]:
            await runtime.route(records)
        wall, cpu = time.perf_counter(), time.process_time()
        for records in work[WARM_BATCHES:]:
            await runtime.route(records)
        n = batch * batches
        return {"cpu_us": round((time.process_time() - cpu) / n * 1e6, 1),
                "wall_us": round((time.perf_counter() - wall) / n * 1e6, 1)}
    finally:
        await runtime.stop()
        await drop_keys(settings.redis_url.get_secret_value(), settings.redis_prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["keyword", "cpu"], default="keyword")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = [asyncio.run(one_run(args.engine, args.batch, args.batches)) for _ in range(args.runs)]
    result: dict[str, Any] = {
        "engine": args.engine, "batch": args.batch, "batches": args.batches,
        "unique_prompts": UNIQUE_PROMPTS, "runs": runs,
        "cpu_us_median": statistics.median(r["cpu_us"] for r in runs),
        "wall_us_median": statistics.median(r["wall_us"] for r in runs),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
