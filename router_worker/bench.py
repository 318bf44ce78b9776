"""`router-worker bench`: pipeline vs bare aiokafka passthrough, latency at an offered rate."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from router_worker import bench_peer, topics
from router_worker.commands.admin import apply_topics
from router_worker.config import load_config
from router_worker.embedded import EmbeddedStack, free_port, resolve_stack
from router_worker.enrich import drop_keys
from router_worker.kafka import consumer_options, group_consumer_options, producer_options
from router_worker.settings import Settings
from router_worker.store.connect import connect
from router_worker.store.migrate import drop_schema, migrate

CORPUS = Path("data") / "prompts"
FALLBACK_PROMPTS = [
    "Write a Python function that merges two sorted lists.",
    "hi! how's it going?",
    "kubectl shows CrashLoopBackOff for my pod after the deploy, why?",
    "What is the derivative of x^3 ln x?",
    "Summarize: the board agreed to delay the launch by two weeks due to supplier issues.",
]


def load_prompts(limit: int = 5000) -> list[str]:
    """Realistic prompts: the corpus when present, else a few built-in ones."""
    prompts: list[str] = []
    for path in sorted(CORPUS.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            if line.strip():
                prompts.append(str(orjson.loads(line)["prompt"]))
    random.Random(11).shuffle(prompts)
    return prompts[:limit] or FALLBACK_PROMPTS


# Unique prompts defeat the decision cache, so every request pays for classification: the
# benchmark reports the cost of new traffic, not of repeats (set ROUTER_BENCH_REPEAT=1 to reuse).
UNIQUE_PROMPTS = os.environ.get("ROUTER_BENCH_REPEAT") != "1"
# Request-id prefixes of the latency runs: the measured requests (the watcher keeps their
# decisions' timings) and the warm-up before them.
MEASURED_ID = "lat-"
WARMUP_ID = "warm-"


def _prompt(prompts: list[str], index: int, rid: str) -> str:
    base = prompts[index % len(prompts)]
    return f"{base} [{rid}]" if UNIQUE_PROMPTS else base


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return round(ordered[index], 3)


@dataclass
class OutputWatcher:
    """Reads an output topic from the start and timestamps each new request_id's arrival."""

    settings: Settings
    topic_names: list[str]
    arrivals: dict[str, float] = field(default_factory=dict)
    # request_id -> when `offered_load` published it (the monotonic clock `arrivals` uses)
    published: dict[str, float] = field(default_factory=dict)
    # request_id -> the decision's own timings_ms, for requests whose id starts with `timed`
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    timed: str = MEASURED_ID
    _task: asyncio.Task[None] | None = None
    _consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            **consumer_options(self.settings),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        await consumer.topics()
        parts = [
            TopicPartition(t, p)
            for t in self.topic_names
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        self._consumer = consumer
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=50, max_records=10000)
            now = time.monotonic()
            for records in batches.values():
                for record in records:
                    key = (record.key or b"").decode()
                    self.arrivals.setdefault(key, now)
                    if key.startswith(self.timed) and record.value:
                        self.timings[key] = orjson.loads(record.value).get("timings_ms") or {}

    async def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return len(self.arrivals) >= n

    def rate(self) -> float:
        times = sorted(self.arrivals.values())
        if len(times) < 2:
            return 0.0
        return round(len(times) / max(times[-1] - times[0], 1e-6), 1)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


def worker_timings(timings: dict[str, dict[str, float]]) -> dict[str, float]:
    """p50/p99 of each stage the decisions report (queue, enrich, classify, total)."""
    out: dict[str, float] = {}
    for stage in ("queue", "enrich", "classify", "total"):
        values = [t[stage] for t in timings.values() if stage in t]
        if values:
            out[f"{stage}_p50"] = percentile(values, 50)
            out[f"{stage}_p99"] = percentile(values, 99)
    return out


async def preload(settings: Settings, prompts: list[str], n: int, tag: str) -> list[str]:
    """Publish n requests to the requested topic before anything consumes them."""
    producer = AIOKafkaProducer(**{**producer_options(settings), "linger_ms": 5})
    await producer.start()
    ids = [f"{tag}-{i}" for i in range(n)]
    try:
        futures = []
        for i, rid in enumerate(ids):
            body = {"request_id": rid, "tenant_id": "bench", "prompt": _prompt(prompts, i, rid)}
            futures.append(
                await producer.send(
                    settings.topic(topics.REQUESTED), orjson.dumps(body), key=rid.encode()
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return ids


def _hop_consumer(settings: Settings, group_suffix: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        settings.topic(topics.REQUESTED),
        **group_consumer_options(settings, f"{settings.app_id}-{group_suffix}", 1000),
    )


async def bare_hop(consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, out_topic: str) -> int:
    """One bare consume -> produce -> commit round; the records it moved."""
    batches = await consumer.getmany(timeout_ms=100, max_records=1000)
    futures = [
        await producer.send(out_topic, r.value, key=r.key)
        for records in batches.values()
        for r in records
    ]
    await asyncio.gather(*futures)
    if batches:
        await consumer.commit({tp: recs[-1].offset + 1 for tp, recs in batches.items()})
    return len(futures)


async def passthrough(settings: Settings, n: int, timeout: float) -> float:
    """Bare aiokafka consume -> produce -> commit on the same topics: the physical limit."""
    out_topic = settings.topic(topics.COMPLETED)
    watcher = OutputWatcher(settings, [out_topic])
    await watcher.start()
    consumer = _hop_consumer(settings, "passthrough")
    producer = AIOKafkaProducer(**producer_options(settings))
    await asyncio.gather(consumer.start(), producer.start())
    try:
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < n and time.monotonic() < deadline:
            seen += await bare_hop(consumer, producer, out_topic)
        await watcher.wait_for(n, 10)
        return watcher.rate()
    finally:
        await asyncio.gather(consumer.stop(), producer.stop())
        await watcher.stop()


async def quix_passthrough(settings: Settings, n: int, timeout: float, log_path: Path) -> float:
    """The same drain through a Quix Streams app (the peer reference), in its own process."""
    out_topic = settings.topic(topics.COMPLETED)
    watcher = OutputWatcher(settings, [out_topic])
    await watcher.start()
    command = [sys.executable, "-m", "router_worker.bench_peer",
               settings.kafka_bootstrap, settings.topic(topics.REQUESTED), out_topic,
               f"{settings.app_id}-quix", str(log_path.parent / "quix-state")]
    with log_path.open("ab") as log:
        peer = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        if not await watcher.wait_for(n, timeout):
            raise RuntimeError(f"Quix Streams moved {len(watcher.arrivals)} of {n} records "
                               f"in {timeout:.0f} s (log: {log_path})")
        return watcher.rate()
    finally:
        stop_processes([peer])
        await watcher.stop()


async def passthrough_latency(
    settings: Settings, prompts: list[str], rate: float, seconds: float, warmup_s: float
) -> Latencies:
    """End-to-end latency of the bare hop at the offered rate: the latency floor of this broker
    and these clients, measured the way the pipeline's is (own fresh topics, same load)."""
    out_topic = settings.topic(topics.COMPLETED)
    watcher = OutputWatcher(settings, [out_topic])
    await watcher.start()
    consumer = _hop_consumer(settings, "passthrough-latency")
    producer = AIOKafkaProducer(**{**producer_options(settings), "linger_ms": 0})
    await asyncio.gather(consumer.start(), producer.start())

    async def hop_forever() -> None:
        while True:
            await bare_hop(consumer, producer, out_topic)

    hop = asyncio.create_task(hop_forever())
    try:
        # The group's first join takes a moment: let it settle, as the workers do.
        deadline = time.monotonic() + 60
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise RuntimeError("the bare hop's consumer got no partitions in 60 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        return await offered_load(settings, prompts, rate, seconds, watcher, warmup_s)
    finally:
        hop.cancel()
        await asyncio.gather(hop, return_exceptions=True)
        await asyncio.gather(consumer.stop(), producer.stop())
        await watcher.stop()


def worker_env(settings_env: dict[str, str], engine: str) -> dict[str, str]:
    return {
        **os.environ,
        **settings_env,
        "ROUTER_ENGINE": engine,
        "ROUTER_LOG_LEVEL": "warning",
        "ROUTER_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, in seconds (Linux; else nan)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy_seconds() -> float:
    """CPU time all cores have spent busy so far (everything but idle and iowait)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS


@dataclass
class CpuMeter:
    """Cores each process kept busy between `start` and `stop`: where a phase's CPU went."""

    pids: dict[str, list[int]]
    _begin: dict[str, float] = field(default_factory=dict)
    _wall: float = 0.0

    def _now(self) -> dict[str, float]:
        used = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}
        used["machine"] = machine_busy_seconds()
        return used

    def start(self) -> None:
        self._begin, self._wall = self._now(), time.monotonic()

    def stop(self) -> dict[str, float]:
        end, wall = self._now(), max(time.monotonic() - self._wall, 1e-6)
        cores = {name: round((end[name] - self._begin[name]) / wall, 2) for name in end}
        # Postgres, Redis and anything else on the machine: what the named processes leave.
        cores["other"] = round(cores["machine"] - sum(v for k, v in cores.items()
                                                      if k != "machine"), 2)
        return cores


def phase_meter(running: Workers, stack: EmbeddedStack) -> CpuMeter:
    """A meter of the workers, the sink, the embedded broker (if any) and the bench itself."""
    return CpuMeter({
        "workers": running.worker_pids,
        "sink": running.sink_pids,
        "broker": [pid for name, pid in stack.pids.items() if name == "kafka"],
        "bench": [os.getpid()],
    })


async def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("worker exited during start-up")
            try:
                if (await client.get(f"http://127.0.0.1:{port}/readyz", timeout=1)).is_success:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("worker not ready")


@dataclass
class Latencies:
    """End-to-end latencies (ms) of an offered load: the measured window and the warm-up."""

    measured: list[float]
    warmup: list[float] = field(default_factory=list)


async def offered_load(
    settings: Settings, prompts: list[str], rate: float, seconds: float, watcher: OutputWatcher,
    warmup_s: float = 0.0,
) -> Latencies:
    """Publish at `rate` req/s for `warmup_s`, then on without a pause for `seconds`; the
    end-to-end latency (ms) of each request, the warm-up's apart.

    Why a warm-up: the window measures steady state. The first requests after a start pay
    one-off costs in every client (metadata, connections, first calls): before the worker
    warmed its Redis connections and classifier at start, the first 50-250 ms saw up to 40 ms,
    and in a 10 s window that is ~1% of the requests, the whole p99. Kafka's load generators
    (OpenMessaging Benchmark) warm up too. The warm-up's latencies are reported, not hidden.
    """
    producer = AIOKafkaProducer(**{**producer_options(settings), "linger_ms": 0})
    await producer.start()
    sent: dict[str, float] = {}
    warm = int(rate * warmup_s)
    # The bench's own heap (earlier phases' ids, the clients) out of the collector's sight:
    # a full collection of it took ~60 ms, a stall of the publisher and the reader that the
    # window would count as latency. After the freeze one took 2-4 ms.
    gc.collect()
    gc.freeze()
    try:
        total = warm + int(rate * seconds)
        start = time.monotonic()
        tick = 0.005  # publish in small slices so the offered rate is smooth
        i = 0
        while i < total:
            due = min(total, int((time.monotonic() - start) * rate) + 1)
            futures = []
            while i < due:
                rid = f"{WARMUP_ID if i < warm else MEASURED_ID}{uuid.uuid4().hex[:12]}"
                body = {
                    "request_id": rid,
                    "tenant_id": "bench",
                    "prompt": _prompt(prompts, i, rid),
                }
                sent[rid] = time.monotonic()
                futures.append(
                    await producer.send(
                        settings.topic(topics.REQUESTED), orjson.dumps(body), key=rid.encode()
                    )
                )
                i += 1
            await asyncio.gather(*futures)
            await asyncio.sleep(tick)
        await watcher.wait_for(len(watcher.arrivals) + 0, 0)
        deadline = time.monotonic() + 30
        while any(r not in watcher.arrivals for r in sent) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await producer.stop()
        gc.unfreeze()
    watcher.published.update(sent)
    out = Latencies([])
    for r, t in sent.items():
        if r in watcher.arrivals:
            (out.warmup if r.startswith(WARMUP_ID) else out.measured).append(
                (watcher.arrivals[r] - t) * 1000
            )
    return out


async def soak(
    settings: Settings,
    prompts: list[str],
    rate: float,
    seconds: float,
    watcher: OutputWatcher,
    pids: list[int],
    every_s: float = 10.0,
) -> list[dict[str, float]]:
    """Offered load for `seconds`, sampling routed/s and worker RSS every `every_s`."""
    samples: list[dict[str, float]] = []

    async def sample() -> None:
        began = time.monotonic()
        last = len(watcher.arrivals)
        while True:
            await asyncio.sleep(every_s)
            now = len(watcher.arrivals)
            samples.append(
                {
                    "t_s": round(time.monotonic() - began, 1),
                    "routed_per_s": round((now - last) / every_s, 1),
                    "rss_mb": sum(rss_mb(p) for p in pids),
                }
            )
            last = now

    sampler = asyncio.create_task(sample())
    try:
        await offered_load(settings, prompts, rate, seconds, watcher)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    return samples


def plot_latencies(latencies: list[float], path: Path, title: str) -> None:
    """Latency histogram PNG (needs matplotlib: the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'router-worker[plot]'") from exc
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(latencies, bins=80, color="#3b6ea5")
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        value = percentile(latencies, q)
        ax.axvline(value, color="black", linestyle=style, label=f"p{q} = {value:.1f} ms")
    ax.set_xlabel("end-to-end latency (ms): publish -> decision consumed")
    ax.set_ylabel("requests")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def wait_for_rows(dsn: str, schema: str, n: int, deadline: float) -> None:
    """Until `schema`'s routing_events holds `n` rows or `deadline` (monotonic) passes.

    One connection polls: a connection per poll would start a Postgres backend 20 times a
    second, CPU taken from the sink it is timing (scripts/sink_drain.py found the same).
    """
    conn = await connect(dsn, schema)
    try:
        while (int(await conn.fetchval("SELECT count(*) FROM routing_events")) < n
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def settings_for(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@dataclass
class Workers:
    """Route worker processes (and the sink, when separate) started for one bench phase."""

    procs: list[subprocess.Popen[bytes]]
    ports: list[int]
    count: int

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs[: self.count]]

    @property
    def sink_pids(self) -> list[int]:
        return [p.pid for p in self.procs[self.count :]]

    def rss_mb(self) -> float:
        return round(sum(rss_mb(pid) for pid in self.worker_pids), 1)

    async def ready(self) -> None:
        for port, proc in zip(self.ports, self.procs, strict=False):
            await _wait_ready(port, proc, 120)

    def stop(self) -> None:
        stop_processes(self.procs)


def stop_processes(procs: list[subprocess.Popen[bytes]], grace_s: float = 30) -> None:
    """SIGTERM every process, then wait for each; one still running after `grace_s` is killed."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_workers(
    env: dict[str, str], engine: str, count: int, separate_sink: bool, run_dir: Path, tag: str
) -> Workers:
    """Start `count` route workers (and a sink process) on the topics `env` names."""
    env = {**env, "ROUTER_RUN_SINK": "false"} if separate_sink else env
    procs: list[subprocess.Popen[bytes]] = []
    ports = [free_port() for _ in range(count)]
    with (run_dir / "bench-worker.log").open("ab") as log:
        for index, port in enumerate(ports):
            command = [
                sys.executable, "-m", "router_worker", "--datadir",
                str(run_dir / f"{tag}-{index}"), "worker", "--web-port", str(port), "-l", "warn",
            ]
            procs.append(subprocess.Popen(
                command, env=worker_env(env, engine), stdout=log, stderr=subprocess.STDOUT
            ))
        if separate_sink:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "router_worker", "sink"],
                env=worker_env(env, engine), stdout=log, stderr=subprocess.STDOUT,
            ))
    return Workers(procs, ports, count)


async def wait_first_output(watcher: OutputWatcher, running: Workers, timeout: float) -> None:
    """Until the first decision arrives; a worker that exits meanwhile fails the bench."""
    deadline = time.monotonic() + timeout
    while not watcher.arrivals and time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in running.procs):
            raise RuntimeError("a worker exited during start-up (see bench-worker.log)")
        await asyncio.sleep(0.01)


@dataclass
class Phase:
    """One phase's settings on its own topics (and its own schema and Redis prefix)."""

    env: dict[str, str]
    settings: Settings
    tag: str

    @classmethod
    async def create(cls, base: dict[str, str], tag: str, suffix: str) -> Phase:
        name = f"{tag}{suffix}"
        env = {
            **base,
            "ROUTER_TOPIC_PREFIX": f"{name}.",
            "ROUTER_APP_ID": f"{name}-route",
            "ROUTER_SINK_GROUP": f"{name}-sink",
            "ROUTER_DATABASE_SCHEMA": name,
            "ROUTER_REDIS_PREFIX": f"{name}:",
        }
        settings = settings_for(env)
        await apply_topics(settings)
        return cls(env, settings, name)

    async def decisions(self) -> OutputWatcher:
        """A started watcher of this phase's completed and failed topics."""
        watcher = OutputWatcher(
            self.settings, [self.settings.topic(topics.COMPLETED),
                            self.settings.topic(topics.FAILED)]
        )
        await watcher.start()
        return watcher

    @property
    def dsn(self) -> str:
        return self.settings.database_url.get_secret_value()

    async def cleanup(self) -> None:
        await drop_schema(self.dsn, self.tag)
        await drop_keys(self.settings.redis_url.get_secret_value(), self.settings.redis_prefix)


@dataclass
class ThroughputRound:
    """One side-by-side pair of drains: bare passthrough, then the pipeline."""

    passthrough_per_s: float
    pipeline_per_s: float
    cores: dict[str, float]
    sink_rows_per_s: float
    rss_mb: float

    @property
    def ratio(self) -> float:
        if not self.passthrough_per_s:
            return 0.0
        return round(self.pipeline_per_s / self.passthrough_per_s, 3)

    def summary(self) -> dict[str, float]:
        return {"passthrough_per_s": self.passthrough_per_s,
                "pipeline_per_s": self.pipeline_per_s, "ratio": self.ratio}


def median_round(rounds: list[ThroughputRound]) -> ThroughputRound:
    """The round whose ratio is the median (of an even number, the lower of the middle two)."""
    ordered = sorted(rounds, key=lambda r: r.ratio)
    return ordered[(len(ordered) - 1) // 2]


async def throughput_round(
    base: dict[str, str], tag: str, index: int, prompts: list[str], requests: int, engine: str,
    workers: int, separate_sink: bool, run_dir: Path, stack: EmbeddedStack, phases: list[Phase],
) -> ThroughputRound:
    """Drain `requests` through the bare hop, then through the workers, on fresh topics."""
    suffix = str(index) if index else ""  # the first round keeps the historical topic names
    s_pass = (await Phase.create(base, tag, f"p{suffix}")).settings
    await preload(s_pass, prompts, requests, "pass")
    passthrough_rate = await passthrough(s_pass, requests, timeout=300)
    print(f"passthrough: {passthrough_rate:.0f} records/s", file=sys.stderr)

    # The workers start on a preloaded backlog.
    pipe = await Phase.create(base, tag, f"r{suffix}")
    phases.append(pipe)
    await migrate(pipe.dsn, pipe.tag)
    await preload(pipe.settings, prompts, requests, "pipe")
    watcher = await pipe.decisions()
    running = start_workers(pipe.env, engine, workers, separate_sink, run_dir, pipe.tag)
    try:
        await wait_first_output(watcher, running, 180)
        meter = phase_meter(running, stack)
        meter.start()
        done = await watcher.wait_for(requests, 600)
        cores = meter.stop()
        pipeline_rate = watcher.rate()
        print(f"pipeline: {pipeline_rate:.0f} requests/s (complete={done})", file=sys.stderr)
        first_out = min(watcher.arrivals.values(), default=time.monotonic())
        await wait_for_rows(pipe.dsn, pipe.tag, requests, first_out + 600)
        sink_rate = round(requests / max(time.monotonic() - first_out, 1e-6), 1)
        rss = running.rss_mb()
    finally:
        running.stop()
        await watcher.stop()
    return ThroughputRound(passthrough_rate, pipeline_rate, cores, sink_rate, rss)


async def run_bench(
    requests: int,
    rate: float,
    engine: str,
    bootstrap: str | None,
    run_dir: Path,
    latency_seconds: float,
    separate_sink: bool = True,
    workers: int = 1,
    soak_seconds: float = 0.0,
    plot: Path | None = None,
    peer: bool = True,
    partitions: int | None = None,
    warmup_s: float = 1.0,
    rounds: int = 1,
) -> dict[str, Any]:
    """The whole benchmark in one run; returns the JSON object.

    Each phase runs on fresh topics of its own. The embedded broker's cost per record grows
    with the records a topic holds (a bare aiokafka hop at 1,000 msg/s: broker CPU 0.4 -> 1.2
    cores and p99 16 -> 104 ms in 18 s, scripts/broker_floor.py), so a phase on topics an
    earlier phase filled would measure the broker's history, not the code.

    - Latency first: the bare hop and then the pipeline at `rate` for `latency_seconds` each,
      after `warmup_s` of the same load that is reported apart. First, because the broker
      keeps every phase's records in memory: after the throughput phases (80,000 records at
      the default size) the pipeline's p99 at 1,000 req/s was 32-56 ms in four runs, when
      run first 26 and 34 ms.
    - Throughput: passthrough and pipeline both drain a backlog of `requests` published before
      their consumers start, so neither competes with the load generator; `rounds` times in
      turn, each pair on fresh topics.
    - Last, the peer reference: the same drain through Quix Streams (`peers` extra).
    """
    # ROUTER_* settings from the environment (fetch waits, batch sizes, ...) apply to the
    # bench's own clients as they do to the workers it starts; the broker is --bootstrap's.
    base = {
        **{k: v for k, v in os.environ.items()
           if k.startswith("ROUTER_") and k != "ROUTER_KAFKA_BOOTSTRAP"},
        "ROUTER_REDIS_URL": os.environ.get("ROUTER_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "ROUTER_DATABASE_URL": os.environ.get(
            "ROUTER_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    }
    if bootstrap:
        base["ROUTER_KAFKA_BOOTSTRAP"] = bootstrap
    partitions = bench_partitions(partitions, base, workers, soak=soak_seconds > 0)
    base["ROUTER_TOPIC_PARTITIONS"] = str(partitions)
    if partitions < workers:
        print(f"note: {workers} workers on {partitions} partition(s): "
              f"{workers - partitions} will sit idle", file=sys.stderr)
    plan = await resolve_stack(base, probe=True)
    stack = EmbeddedStack(run_dir, kafka=plan.kafka, redis=plan.redis, postgres=plan.postgres)
    urls = await stack.start()
    base = {**base, **urls.env()}
    tag = f"bench{uuid.uuid4().hex[:6]}"
    prompts = load_prompts()
    phases: list[Phase] = []
    try:
        # 1. Latency, bare hop: the floor for the pipeline's latency on this broker.
        s_floor = (await Phase.create(base, tag, "q")).settings
        floor = await passthrough_latency(s_floor, prompts, rate, latency_seconds, warmup_s)

        # 2. Latency (and soak), pipeline.
        lat = await Phase.create(base, tag, "l")
        phases.append(lat)
        await migrate(lat.dsn, lat.tag)
        watcher = await lat.decisions()
        running = start_workers(lat.env, engine, workers, separate_sink, run_dir, lat.tag)
        try:
            await running.ready()
            # Let the group settle with every member before the load arrives: a rebalance in
            # the middle of the measurement would be measured as routing time.
            await asyncio.sleep(2 + 2 * workers)
            rss_start = running.rss_mb()
            meter = phase_meter(running, stack)
            meter.start()
            latency = await offered_load(lat.settings, prompts, rate, latency_seconds, watcher,
                                         warmup_s)
            latencies = latency.measured
            latency_cores = meter.stop()
            timings = worker_timings(watcher.timings)
            soak_samples = (
                await soak(lat.settings, prompts, rate, soak_seconds, watcher,
                           running.worker_pids)
                if soak_seconds > 0
                else []
            )
            rss_end = running.rss_mb()
        finally:
            running.stop()
            await watcher.stop()

        # 3-4. Throughput, bare hop then pipeline, `rounds` times in turn: on a shared machine
        # whose speed drifts, each ratio compares two drains run side by side.
        measured: list[ThroughputRound] = []
        for index in range(rounds):
            if rounds > 1:
                print(f"throughput round {index + 1}/{rounds}", file=sys.stderr)
            measured.append(await throughput_round(
                base, tag, index, prompts, requests, engine, workers, separate_sink, run_dir,
                stack, phases,
            ))
        throughput = median_round(measured)

        # 5. Throughput, the peer reference (when the `peers` extra is installed), last so
        # that nothing it leaves behind in the broker can touch the other phases.
        # It connects in plaintext: skipped against a broker that needs TLS or SASL.
        quix_version = bench_peer.available() if peer else None
        quix_rate: float | None = None
        if quix_version is not None and s_floor.kafka_security_protocol == "PLAINTEXT":
            s_quix = (await Phase.create(base, tag, "x")).settings
            await preload(s_quix, prompts, requests, "quix")
            quix_rate = await quix_passthrough(s_quix, requests, 300, run_dir / "bench-quix.log")
            print(f"quix streams passthrough: {quix_rate:.0f} records/s", file=sys.stderr)
    finally:
        for phase in phases:
            await phase.cleanup()
        await stack.stop()
    result: dict[str, Any] = {
        # With --rounds N: medians over the rounds; `ratio` is the median of the rounds' own
        # ratios, and the cores, sink rate and RSS below are the median-ratio round's.
        "passthrough_per_s": round(statistics.median(r.passthrough_per_s for r in measured), 1),
        "pipeline_per_s": round(statistics.median(r.pipeline_per_s for r in measured), 1),
        "ratio": (round(statistics.median(r.ratio for r in measured), 3)
                  if all(r.passthrough_per_s for r in measured) else None),
        "rounds": rounds,
        "throughput_rounds": [r.summary() for r in measured],
        # The same drain through Quix Streams (null without the `peers` extra).
        "quix_passthrough_per_s": quix_rate,
        "quix_streams_version": quix_version,
        "latency_ms": _percentiles(latencies),
        # The same offered load through the bare aiokafka hop: this broker's latency floor.
        "passthrough_latency_ms": _percentiles(floor.measured),
        # Both ran `warmup_s` at the offered rate first, not counted above; the pipeline's:
        "warmup_s": warmup_s,
        "warmup_latency_ms": _percentiles(latency.warmup) if latency.warmup else None,
        # Where the time went, from the decisions themselves: `queue` = publish -> the worker
        # starts the batch (broker and fetch wait), `total` = queue + enrich + classify.
        "worker_timings_ms": timings,
        "offered_rate": rate,
        "latency_requests": len(latencies),
        "engine": engine,
        # Whether the workers used the decision cache (routing config `cache.enabled`; `auto`
        # uses it with a learned engine only). Unique prompts never hit it; this says whether
        # they paid for the lookups.
        "decision_cache": load_config(settings_for(base).config).cache.active(
            engine != "keyword"),
        "requests": requests,
        "sink_rows_per_s": throughput.sink_rows_per_s,
        # Cores each process kept busy while the pipeline ran (`other`: Postgres, Redis, ...).
        "pipeline_cpu_cores": throughput.cores,
        # The same during the latency run: how busy the machine was at the offered rate.
        "latency_cpu_cores": latency_cores,
        "sink": "separate process" if separate_sink else "in the worker process",
        "workers": workers,
        "partitions": partitions,
        "unique_prompts": UNIQUE_PROMPTS,
        "rss_mb": max(max(r.rss_mb for r in measured), rss_start, rss_end),
        "rss_mb_start": rss_start,
        "rss_mb_end": rss_end,
        "rss_mb_after_throughput": throughput.rss_mb,
        "cpu_count": os.cpu_count(),
    }
    if soak_seconds > 0:
        result["soak"] = {"duration_s": soak_seconds, "offered_rate": rate, "samples": soak_samples}
    if plot is not None:
        plot_latencies(latencies, plot, f"router-worker, {engine} engine, {rate:.0f} req/s offered")
        result["plot"] = str(plot)
    return result


# A soak's partitions when neither --partitions nor ROUTER_TOPIC_PARTITIONS says: the embedded
# broker stalls once a partition holds ~10,000 record batches (at 75 req/s, one record a batch:
# after ~150 s on one partition, ~500 s on four); on 16 a 10-minute soak ran to the end.
SOAK_PARTITIONS = 16


def bench_partitions(
    flag: int | None, env: dict[str, str], workers: int, soak: bool = False
) -> int:
    """Partitions of the bench topics: --partitions, else ROUTER_TOPIC_PARTITIONS, else one
    per worker (a soak: SOAK_PARTITIONS).

    Why one per worker by default: a partition is the unit a worker takes, so one worker
    needs only one, and every extra partition splits each produce into more, smaller record
    batches. The embedded broker pays per stored batch on every fetch: at 1,000 records/s a
    bare aiokafka hop on 4 partitions kept it at 0.7-0.8 cores with p99 24-39 ms after 8 s,
    on 1 partition at 0.4 cores with p99 16-17 ms (scripts/broker_floor.py). Real
    Kafka/Redpanda index their logs and do not care; production keeps ROUTER_TOPIC_PARTITIONS.
    """
    if flag is not None:
        return flag
    if env.get("ROUTER_TOPIC_PARTITIONS"):
        return int(env["ROUTER_TOPIC_PARTITIONS"])
    return max(workers, SOAK_PARTITIONS if soak else 1)


def _percentiles(latencies: list[float]) -> dict[str, float]:
    return {f"p{q}": percentile(latencies, q) for q in (50, 95, 99)}
