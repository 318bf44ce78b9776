"""Training sets from recorded traffic: decisions joined with outcomes and labels.

A row becomes a training example when a human/judge labelled it (`routing_outcomes.label`),
or when the decision was confident (confidence >= threshold) and the call it led to succeeded.
Prompts come from `routing_events.prompt` (tenants with store_prompts: true) or, with
`from_topic`, from the requested topic within its retention, joined by request_id.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from router_worker import topics
from router_worker.classify.data import normalise
from router_worker.events import RoutingRequested
from router_worker.kafka import consumer_options
from router_worker.settings import Settings
from router_worker.store.connect import connect

# Labelled rows first: a human's label beats the classifier's own confident guess.
_EXPORT_SQL = """
SELECT e.request_id, e.prompt, COALESCE(o.label, e.category) AS category, e.complexity,
       (o.label IS NOT NULL) AS labelled
FROM routing_events e LEFT JOIN routing_outcomes o USING (request_id)
WHERE e.status = 'completed' AND e.complexity IS NOT NULL
  AND ($1::timestamptz IS NULL OR e.decided_at >= $1)
  AND (o.label IS NOT NULL OR (e.confidence >= $2 AND o.success IS TRUE))
ORDER BY (o.label IS NOT NULL) DESC, e.decided_at
"""


@dataclass
class ExportStats:
    """What an export wrote and why the rest was left out."""

    candidates: int = 0
    written: int = 0
    labelled: int = 0
    duplicates: int = 0
    over_cap: int = 0
    no_prompt: int = 0
    per_class: Counter[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON form for the CLI."""
        return {**{k: v for k, v in self.__dict__.items() if k != "per_class"},
                "per_class": dict(self.per_class or {})}


class ExampleWriter:
    """Dedup (normalised prompt) and per-class cap in front of a jsonl file."""

    def __init__(self, out: IO[bytes], max_per_class: int, stats: ExportStats) -> None:
        self._out = out
        self._cap = max_per_class
        self._seen: set[bytes] = set()  # 16-byte digests: bounded, whatever the prompt sizes
        self.stats = stats
        stats.per_class = Counter()

    def offer(self, prompt: str, category: str, complexity: str, labelled: bool,
              request_id: str) -> bool:
        """Write the example unless it is a duplicate or its class is full."""
        assert self.stats.per_class is not None
        digest = hashlib.blake2b(normalise(prompt).encode(), digest_size=16).digest()
        if digest in self._seen:
            self.stats.duplicates += 1
            return False
        if self.stats.per_class[category] >= self._cap:
            self.stats.over_cap += 1
            return False
        self._seen.add(digest)
        self.stats.per_class[category] += 1
        self.stats.written += 1
        self.stats.labelled += labelled
        self._out.write(orjson.dumps({
            "prompt": prompt, "category": category, "complexity": complexity,
            "request_id": request_id, "source": "label" if labelled else "confident",
        }) + b"\n")
        return True


def requested_prompts(settings: Settings, wanted: set[str], idle_s: float = 2.0) -> dict[str, str]:
    """Prompt text of `wanted` request_ids, read from the requested topic (no consumer group)."""
    import asyncio

    return asyncio.run(_read_prompts(settings, wanted, idle_s))


async def _read_prompts(settings: Settings, wanted: set[str], idle_s: float) -> dict[str, str]:
    consumer = AIOKafkaConsumer(**consumer_options(settings), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    found: dict[str, str] = {}
    try:
        topic = settings.topic(topics.REQUESTED)
        await consumer.topics()
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        last = time.monotonic()
        # End offsets are unreliable on the embedded broker: read until nothing new arrives.
        while len(found) < len(wanted) and time.monotonic() - last < idle_s:
            got = await consumer.getmany(timeout_ms=200, max_records=5000)
            if any(got.values()):
                last = time.monotonic()
            for records in got.values():
                for record in records:
                    rid = (record.key or b"").decode("utf-8", "replace")
                    if rid not in wanted or rid in found:
                        continue
                    try:
                        request = RoutingRequested.model_validate_json(record.value or b"")
                        found[rid] = request.text()
                    except ValueError:
                        continue
    finally:
        await consumer.stop()
    return found


async def _rows(settings: Settings, since: datetime | None,
                min_confidence: float) -> list[asyncpg.Record]:
    conn = await connect(settings.database_url.get_secret_value(), settings.database_schema)
    try:
        return list(await conn.fetch(_EXPORT_SQL, since, min_confidence))
    finally:
        await conn.close()


def _examples(rows: list[asyncpg.Record],
              prompts: dict[str, str]) -> Iterator[tuple[str, str, str, bool, str]]:
    for row in rows:
        prompt = row["prompt"] or prompts.get(row["request_id"])
        if prompt:
            yield prompt, row["category"], row["complexity"], row["labelled"], row["request_id"]


def export(settings: Settings, out: Path, *, since: datetime | None = None,
           min_confidence: float = 0.8, max_per_class: int = 5000,
           from_topic: bool = False) -> ExportStats:
    """Write the training set to `out` (jsonl, atomically); returns what was kept and dropped."""
    import asyncio

    rows = asyncio.run(_rows(settings, since, min_confidence))
    stats = ExportStats(candidates=len(rows))
    missing = {r["request_id"] for r in rows if not r["prompt"]}
    prompts = requested_prompts(settings, missing) if from_topic and missing else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as handle:
        writer = ExampleWriter(handle, max_per_class, stats)
        kept = 0
        for example in _examples(rows, prompts):
            kept += 1
            writer.offer(*example)
    os.replace(tmp, out)
    stats.no_prompt = len(rows) - kept
    return stats
