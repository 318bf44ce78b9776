"""Per-request latency traces of `router-worker bench`'s two latency windows.

Runs the bench's latency phases only (bare hop, then the pipeline at the offered rate) and
writes, for every measured request, when it was published, its end-to-end latency and the
stage timings its decision reports (queue, enrich, classify, total). A percentile says how slow
the tail is; the trace says when the slow requests came and in which stage they waited.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/latency_trace.py --out /tmp/trace.json
    .venv/bin/python scripts/latency_trace.py --summarise /tmp/trace.json

Development tool: the figures it prints are indicative, like the bench's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path
from typing import Any

import orjson

from router_worker import bench

_WINDOWS: list[dict[str, Any]] = []


def _wrap_offered_load() -> None:
    original = bench.offered_load

    async def traced(settings: Any, prompts: list[str], rate: float, seconds: float,
                     watcher: bench.OutputWatcher, warmup_s: float = 0.0) -> bench.Latencies:
        result = await original(settings, prompts, rate, seconds, watcher, warmup_s)
        start = min(watcher.published.values(), default=0.0)
        rows = []
        for rid, sent in watcher.published.items():
            if not rid.startswith(bench.MEASURED_ID) or rid not in watcher.arrivals:
                continue
            rows.append({"t": round(sent - start, 4),
                         "ms": round((watcher.arrivals[rid] - sent) * 1000, 3),
                         **watcher.timings.get(rid, {})})
        rows.sort(key=lambda r: r["t"])
        # run_bench measures the bare hop first, then the pipeline
        # t0: the first publish on time.monotonic(), the clock other probes can share
        _WINDOWS.append({"name": "pipeline" if _WINDOWS else "bare_hop", "t0": start,
                         "rows": rows})
        return result

    bench.offered_load = traced  # type: ignore[assignment]


def summarise(windows: list[dict[str, Any]], threshold_ms: float) -> None:
    """Per window: p50/p99, the slow requests per second of the window, and the slow ones'
    stage medians against everyone's."""
    for window in windows:
        rows = window["rows"]
        ms = [r["ms"] for r in rows]
        print(f"== {window['name']}: n={len(rows)} p50={bench.percentile(ms, 50)} "
              f"p99={bench.percentile(ms, 99)}")
        seconds = int(max(r["t"] for r in rows)) + 1 if rows else 0
        per_second = []
        for s in range(seconds):
            part = [r["ms"] for r in rows if s <= r["t"] < s + 1]
            slow = sum(1 for v in part if v > threshold_ms)
            per_second.append(f"{s}s:{slow}/{bench.percentile(part, 99) if part else 0:.0f}")
        print("  slow/p99 per second:", " ".join(per_second))
        if not rows or "total" not in rows[0]:
            continue
        slow_rows = [r for r in rows if r["ms"] > threshold_ms]
        for label, subset in (("all", rows), (f"> {threshold_ms} ms", slow_rows)):
            if not subset:
                continue
            stages = {k: statistics.median(r[k] for r in subset)
                      for k in ("queue", "enrich", "classify", "total")}
            after = statistics.median(r["ms"] - r["total"] for r in subset)
            print(f"  {label:>10} n={len(subset)}: "
                  + " ".join(f"{k}={v:.1f}" for k, v in stages.items())
                  + f" after_worker={after:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("latency-trace.json"))
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--engine", default="cpu", choices=["cpu", "keyword"])
    parser.add_argument("--run-dir", type=Path, default=Path(".run/trace"))
    parser.add_argument("--threshold-ms", type=float, default=25.0)
    parser.add_argument("--summarise", type=Path, default=None,
                        help="print the summary of a trace written before; run nothing")
    args = parser.parse_args()
    if args.summarise is not None:
        summarise(orjson.loads(args.summarise.read_bytes()), args.threshold_ms)
        return
    _wrap_offered_load()
    # Throughput phases are not needed: one tiny drain keeps run_bench's shape.
    asyncio.run(bench.run_bench(requests=200, rate=args.rate, engine=args.engine,
                                bootstrap=None, run_dir=args.run_dir,
                                latency_seconds=args.seconds, peer=False))
    args.out.write_bytes(orjson.dumps(_WINDOWS))
    summarise(_WINDOWS, args.threshold_ms)


if __name__ == "__main__":
    main()
