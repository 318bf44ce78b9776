"""`router-worker bench` runs the whole benchmark on the real broker and prints its contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from router_worker import bench_peer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_bench_prints_the_documented_json_keys(stack_env: dict[str, str], tmp_path: Path) -> None:
    env = {**os.environ, **{k: v for k, v in stack_env.items() if k != "ROUTER_KAFKA_BOOTSTRAP"}}
    command = [
        sys.executable, "-m", "router_worker", "bench", "--requests", "3000", "--rate", "100",
        "--latency-seconds", "2", "--engine", "keyword", "--json", "--partitions", "2",
        "--bootstrap", stack_env["ROUTER_KAFKA_BOOTSTRAP"], "--run-dir", str(tmp_path),
        "--rounds", "2",
    ]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result = orjson.loads(done.stdout)
    for key in ("passthrough_per_s", "pipeline_per_s", "ratio", "latency_ms", "offered_rate",
                "engine", "rss_mb", "sink_rows_per_s", "pipeline_cpu_cores"):
        assert key in result, key
    assert set(result["latency_ms"]) == {"p50", "p95", "p99"}
    assert set(result["passthrough_latency_ms"]) == {"p50", "p95", "p99"}
    assert result["engine"] == "keyword"
    assert result["decision_cache"] is False  # auto: the keyword tier alone does not cache
    assert result["partitions"] == 2  # the flag wins over the environment's 4
    assert result["offered_rate"] == 100
    assert result["pipeline_per_s"] > 0
    assert result["passthrough_per_s"] > 0
    assert result["latency_requests"] == 200  # every offered request was routed
    assert result["warmup_s"] == 1.0  # 100 more requests before the window, counted apart
    assert set(result["warmup_latency_ms"]) == {"p50", "p95", "p99"}
    assert result["latency_cpu_cores"]["workers"] > 0
    # The latency run's decisions, not the throughput run's (which carry no "lat-" ids).
    assert {"queue_p50", "enrich_p99", "classify_p50", "total_p99"} <= set(
        result["worker_timings_ms"])
    assert result["rss_mb"] > 0
    assert result["pipeline_cpu_cores"]["workers"] > 0
    # Two side-by-side pairs of drains; the headline figures are their medians.
    rounds = result["throughput_rounds"]
    assert result["rounds"] == len(rounds) == 2
    for pair in rounds:
        assert pair["ratio"] == round(pair["pipeline_per_s"] / pair["passthrough_per_s"], 3)
    assert result["ratio"] == pytest.approx(sum(p["ratio"] for p in rounds) / 2, abs=1e-3)
    assert result["pipeline_per_s"] == pytest.approx(
        sum(p["pipeline_per_s"] for p in rounds) / 2, abs=0.1)
    if bench_peer.available() is None:  # the `peers` extra is optional
        assert result["quix_passthrough_per_s"] is None
    else:
        assert result["quix_passthrough_per_s"] > 0
        # Quix's state directory (it makes one even when stateless) stays in the run directory
        assert (tmp_path / "quix-state").is_dir()
        assert not [p for p in (ROOT / "state").glob("*") if p.name.startswith("bench")]
