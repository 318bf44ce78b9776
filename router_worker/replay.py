"""Shadow replay: re-route a recorded range of requests with a candidate classifier.

The reader is a consumer of its own (no group: manual assignment, nothing committed), the
router has no enricher and its output is counted, never produced: replay changes no topic,
no consumer group and no Redis key. Memory stays flat: batches in, counters out.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from router_worker.agents.route import Outgoing, Router
from router_worker.classify.cascade import Cascade
from router_worker.classify.engine import Engine
from router_worker.classify.keyword import keyword_engine_from_config
from router_worker.config import load_config
from router_worker.errors import ConfigError
from router_worker.kafka import consumer_options
from router_worker.metrics import create_metrics
from router_worker.settings import Settings
from router_worker.store.connect import connect
from router_worker.validate import Inbound

log = structlog.get_logger(__name__)

_LOOKUP_SQL = (
    "SELECT request_id, status, category, model, estimated_cost_usd, classifier_version "
    "FROM routing_events WHERE request_id = ANY($1::text[])"
)
_TOP_TRANSITIONS = 20


@dataclass(frozen=True, slots=True)
class ReplayRange:
    """Which records to replay: a time range (ms since epoch) or an offset range per partition.

    `to_offset` is exclusive; a missing end means "until nothing new arrives for idle_s".
    """

    topic: str
    from_time_ms: int | None = None
    to_time_ms: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None

    def past_end(self, offset: int, timestamp_ms: int) -> bool:
        """True for the first record beyond the range on its partition."""
        if self.to_offset is not None and offset >= self.to_offset:
            return True
        return self.to_time_ms is not None and timestamp_ms > self.to_time_ms

    def as_dict(self) -> dict[str, Any]:
        """JSON form, kept in checkpoints and reports."""
        return {"topic": self.topic, "from_time_ms": self.from_time_ms,
                "to_time_ms": self.to_time_ms, "from_offset": self.from_offset,
                "to_offset": self.to_offset}


@dataclass(frozen=True, slots=True)
class Recorded:
    """The live decision of one request, from routing_events."""

    status: str
    category: str | None
    model: str | None
    cost_usd: float | None
    classifier_version: str | None


@dataclass
class ReplayStats:
    """Aggregate counters only: constant memory however many events are replayed."""

    replayed: int = 0
    completed: int = 0
    failed: int = 0
    joined: int = 0
    compared: int = 0
    status_changed: int = 0
    same_category: int = 0
    same_model: int = 0
    recorded_cost_usd: float = 0.0
    candidate_cost_usd: float = 0.0
    batches: int = 0
    route_s: float = 0.0
    elapsed_s: float = 0.0
    confusion: Counter[str] = field(default_factory=Counter)  # "recorded|candidate" category
    transitions: Counter[str] = field(default_factory=Counter)  # "recorded->candidate" model
    recorded_versions: Counter[str] = field(default_factory=Counter)

    def tally(self, outgoing: Sequence[Outgoing], recorded: dict[str, Recorded]) -> None:
        """Count one routed batch against the recorded decisions it could be joined with."""
        for out in outgoing:
            self.replayed += 1
            completed = out.status == "completed"
            if completed:
                self.completed += 1
            else:
                self.failed += 1
            old = recorded.get(out.request_id)
            if old is None:
                continue
            self.joined += 1
            self.recorded_versions[old.classifier_version or "unknown"] += 1
            if old.status != out.status:
                self.status_changed += 1
            if not completed or old.status != "completed":
                continue
            self.compared += 1
            _, model, category, _ = out.labels
            self.same_category += category == old.category
            self.same_model += model == old.model
            self.confusion[f"{old.category}|{category}"] += 1
            if model != old.model:
                self.transitions[f"{old.model}->{model}"] += 1
            self.recorded_cost_usd += old.cost_usd or 0.0
            self.candidate_cost_usd += out.cost_usd

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-serialisable (the checkpoint's copy)."""
        counters = ("confusion", "transitions", "recorded_versions")
        plain = {k: v for k, v in self.__dict__.items() if k not in counters}
        return {**plain, **{k: dict(getattr(self, k)) for k in counters}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ReplayStats:
        """The inverse of `to_dict` (resuming from a checkpoint)."""
        stats = cls(**{k: v for k, v in raw.items()
                       if k not in ("confusion", "transitions", "recorded_versions")})
        stats.confusion = Counter(raw.get("confusion", {}))
        stats.transitions = Counter(raw.get("transitions", {}))
        stats.recorded_versions = Counter(raw.get("recorded_versions", {}))
        return stats

    def report(self) -> dict[str, Any]:
        """The replay report: totals, agreement, confusion, changed decisions, cost, speed."""
        confusion: dict[str, dict[str, int]] = {}
        for pair, n in sorted(self.confusion.items()):
            old, _, new = pair.partition("|")
            confusion.setdefault(old, {})[new] = n
        compared = self.compared or 1
        delta = self.candidate_cost_usd - self.recorded_cost_usd
        return {
            "requests_replayed": self.replayed,
            "completed": self.completed,
            "failed": self.failed,
            "joined_with_recorded": self.joined,
            "compared_decisions": self.compared,
            "agreement": {
                "category": round(self.same_category / compared, 4) if self.compared else None,
                "model": round(self.same_model / compared, 4) if self.compared else None,
                "status_changed": self.status_changed,
            },
            "confusion": confusion,
            "decisions_changed": {
                "model": self.compared - self.same_model,
                "category": self.compared - self.same_category,
                "top_model_transitions": dict(self.transitions.most_common(_TOP_TRANSITIONS)),
            },
            "estimated_cost_usd": {
                "recorded": round(self.recorded_cost_usd, 6),
                "candidate": round(self.candidate_cost_usd, 6),
                "delta": round(delta, 6),
                "delta_pct": round(100 * delta / self.recorded_cost_usd, 2)
                if self.recorded_cost_usd else None,
            },
            "recorded_classifier_versions": dict(self.recorded_versions.most_common(10)),
            "throughput": {
                "elapsed_s": round(self.elapsed_s, 3),
                "replayed_per_s": round(self.replayed / self.elapsed_s, 1)
                if self.elapsed_s else None,
                "batches": self.batches,
                "route_ms_per_batch": round(1000 * self.route_s / self.batches, 3)
                if self.batches else None,
            },
        }


def shadow_router(settings: Settings, engine: Engine | None) -> Router:
    """The live routing logic with the current config, minus Redis: nothing is written."""
    config = load_config(settings.config)
    cascade = Cascade(engine, keyword_engine_from_config(config), config.thresholds)
    return Router(settings, config, cascade, None, create_metrics())


def _inbound(record: Any) -> Inbound:
    return Inbound(
        value=record.value, key=record.key,
        headers=tuple((str(k), bytes(v or b"")) for k, v in (record.headers or ())),
        topic=record.topic, partition=record.partition, offset=record.offset,
        timestamp_ms=float(record.timestamp or 0),
    )


class RangeReader:
    """Reads a range of one topic with manual assignment and no consumer group.

    End offsets are not trusted (the embedded broker reports the last batch's first offset + 1):
    a partition ends at its first record past the range, or all end when nothing arrived for
    `idle_s`.
    """

    def __init__(self, settings: Settings, span: ReplayRange, *, batch_size: int = 2048,
                 idle_s: float = 2.0, start: dict[int, int] | None = None,
                 done: set[int] | None = None) -> None:
        self.settings = settings
        self.span = span
        self.batch_size = batch_size
        self.idle_s = idle_s
        self.next_offsets: dict[int, int] = dict(start or {})
        self.done: set[int] = set(done or ())
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        """Connect, assign every partition of the topic and seek to the range's start."""
        consumer = AIOKafkaConsumer(
            **consumer_options(self.settings), group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        self._consumer = consumer
        await consumer.topics()
        partitions = sorted(consumer.partitions_for_topic(self.span.topic) or ())
        if not partitions:
            raise ConfigError(f"topic {self.span.topic} does not exist or has no partitions")
        parts = [TopicPartition(self.span.topic, p) for p in partitions if p not in self.done]
        consumer.assign(parts)
        starts = await self._starts(consumer, parts)
        for tp in parts:
            if starts.get(tp) is None:
                self.done.add(tp.partition)
                consumer.pause(tp)
            else:
                consumer.seek(tp, starts[tp])

    async def _starts(self, consumer: AIOKafkaConsumer,
                      parts: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        if self.next_offsets or self.span.from_time_ms is None:
            base = self.span.from_offset or 0
            return {tp: self.next_offsets.get(tp.partition, base) for tp in parts}
        found = await consumer.offsets_for_times(dict.fromkeys(parts, self.span.from_time_ms))
        return {tp: (found[tp].offset if found.get(tp) is not None else None) for tp in parts}

    async def batches(self) -> AsyncIterator[list[Inbound]]:
        """Batches of records in range, until every partition has ended."""
        consumer = self._consumer
        assert consumer is not None
        active = {tp for tp in consumer.assignment() if tp.partition not in self.done}
        last_data = time.monotonic()
        while active:
            got = await consumer.getmany(*active, timeout_ms=200, max_records=self.batch_size)
            if not any(got.values()):
                if time.monotonic() - last_data >= self.idle_s:
                    break
                continue
            last_data = time.monotonic()
            batch: list[Inbound] = []
            for tp, records in got.items():
                for record in records:
                    if self.span.past_end(record.offset, record.timestamp):
                        active.discard(tp)
                        self.done.add(tp.partition)
                        consumer.pause(tp)
                        break
                    batch.append(_inbound(record))
                    self.next_offsets[tp.partition] = record.offset + 1
            if batch:
                yield batch

    async def stop(self) -> None:
        """Close the consumer (nothing to commit: it has no group)."""
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


class RecordedLookup:
    """One query per batch: the live decisions of the batch's request_ids."""

    def __init__(self, dsn: str, schema: str) -> None:
        self._dsn = dsn
        self._schema = schema
        self._conn: asyncpg.Connection | None = None

    async def start(self) -> None:
        """Connect with the router's schema on the search path."""
        self._conn = await connect(self._dsn, self._schema)

    async def fetch(self, request_ids: list[str]) -> dict[str, Recorded]:
        """Recorded decisions by request_id (missing ids are simply absent)."""
        assert self._conn is not None
        rows = await self._conn.fetch(_LOOKUP_SQL, request_ids)
        return {r["request_id"]: Recorded(r["status"], r["category"], r["model"],
                                          r["estimated_cost_usd"], r["classifier_version"])
                for r in rows}

    async def stop(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def request_ids(batch: Sequence[Inbound]) -> list[str]:
    """Cheap ids for the join: the record key (what producers set to the request_id)."""
    return [i.key.decode("utf-8", "replace") for i in batch if i.key]


@dataclass
class Checkpoint:
    """Per-partition next offsets and the counters so far, rewritten atomically."""

    path: Path
    span: ReplayRange
    candidate: str

    def save(self, reader: RangeReader, stats: ReplayStats) -> None:
        """Write the checkpoint (tmp file + rename: a crash leaves the previous one)."""
        body = {"range": self.span.as_dict(), "candidate": self.candidate,
                "offsets": {str(p): o for p, o in reader.next_offsets.items()},
                "done": sorted(reader.done), "stats": stats.to_dict()}
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(orjson.dumps(body))
        os.replace(tmp, self.path)

    def load(self) -> tuple[dict[int, int], set[int], ReplayStats]:
        """(next offsets, finished partitions, counters) of a previous run of the same range."""
        raw = orjson.loads(self.path.read_bytes())
        if raw.get("range") != self.span.as_dict():
            raise ConfigError(f"checkpoint {self.path} is for another range: {raw.get('range')}")
        offsets = {int(p): int(o) for p, o in raw["offsets"].items()}
        return offsets, set(raw.get("done", [])), ReplayStats.from_dict(raw["stats"])


Progress = Callable[[ReplayStats], None]


async def replay(
    settings: Settings,
    span: ReplayRange,
    engine: Engine | None,
    *,
    join: bool = True,
    checkpoint: Path | None = None,
    resume: bool = False,
    batch_size: int = 2048,
    idle_s: float = 2.0,
    progress: Progress | None = None,
    progress_every_s: float = 2.0,
) -> dict[str, Any]:
    """Replay `span` in shadow through the routing logic with `engine`; returns the report."""
    router = shadow_router(settings, engine)
    store = Checkpoint(checkpoint, span, router.cascade.version) if checkpoint else None
    start: dict[int, int] = {}
    done: set[int] = set()
    stats = ReplayStats()
    if store is not None and resume and store.path.exists():
        start, done, stats = store.load()
    reader = RangeReader(settings, span, batch_size=batch_size, idle_s=idle_s,
                         start=start, done=done)
    lookup = (RecordedLookup(settings.database_url.get_secret_value(), settings.database_schema)
              if join else None)
    if lookup is not None:
        await lookup.start()
    await reader.start()
    began = time.monotonic() - stats.elapsed_s
    last_data = time.monotonic()
    next_progress = time.monotonic() + progress_every_s
    try:
        async for batch in reader.batches():
            t0 = time.monotonic()
            if lookup is not None:
                outgoing, recorded = await asyncio.gather(
                    router.route(batch), lookup.fetch(request_ids(batch)))
            else:
                outgoing, recorded = await router.route(batch), {}
            last_data = time.monotonic()
            stats.route_s += last_data - t0
            stats.batches += 1
            stats.tally(outgoing, recorded)
            # Throughput runs from the first record to the last, not through the idle tail.
            stats.elapsed_s = last_data - began
            if last_data >= next_progress:
                next_progress = last_data + progress_every_s
                if store is not None:
                    store.save(reader, stats)
                if progress is not None:
                    progress(stats)
    finally:
        await reader.stop()
        if lookup is not None:
            await lookup.stop()
    if store is not None:
        store.save(reader, stats)
    report = stats.report()
    report["range"] = span.as_dict()
    report["candidate_classifier_version"] = router.cascade.version
    report["partitions_next_offsets"] = {str(p): o for p, o in sorted(reader.next_offsets.items())}
    return report
