"""The sink agent: its own consumer group, batches to Postgres, commits after durability."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from mode import Service

from router_worker import topics
from router_worker.errors import DependencyUnavailable, RowsRejected
from router_worker.kafka import (
    Fetched,
    commit_or_warn,
    fetch_or_warn,
    group_consumer_options,
    partition_lag,
)
from router_worker.metrics import Metrics
from router_worker.settings import Settings
from router_worker.store.outcomes import outcome_row
from router_worker.store.postgres import EventWriter, Source, may_hold_nul, row_from_event

log = structlog.get_logger(__name__)

_BACKOFF_START_S = 0.2
_BACKOFF_MAX_S = 5.0
# A fetch that brought fewer than 1/_FILL_BELOW of a full batch is a trickle worth filling.
_FILL_BELOW = 10


def rows_from_records(
    records: list[ConsumerRecord[bytes, bytes]], status_of: dict[str, str],
) -> list[tuple[Any, ...]]:
    """Rows for every well-formed record; a foreign, malformed record is logged and skipped."""
    rows = []
    for record in records:
        if record.topic not in status_of:
            continue
        value = record.value or b""
        try:
            event = orjson.loads(value)
            rows.append(row_from_event(status_of[record.topic], event,
                                       Source(record.topic, record.partition, record.offset),
                                       may_hold_nul=may_hold_nul(value)))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.error("sink_record_malformed", topic=record.topic, partition=record.partition,
                      offset=record.offset, error=repr(exc)[:200])
    return rows


def outcome_rows(records: list[ConsumerRecord[bytes, bytes]], topic: str) -> list[tuple[Any, ...]]:
    """`routing_outcomes` rows for the outcome records; malformed ones are logged and skipped."""
    rows = []
    for record in records:
        if record.topic != topic:
            continue
        try:
            rows.append(outcome_row(orjson.loads(record.value or b""), record.topic,
                                    record.partition, record.offset))
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            log.error("sink_outcome_malformed", topic=record.topic, partition=record.partition,
                      offset=record.offset, error=repr(exc)[:200])
    return rows


class SinkAgent(Service):
    """Consumes completed/failed events and makes them durable rows."""

    def __init__(self, settings: Settings, metrics: Metrics, **kwargs: Any) -> None:
        self.settings = settings
        self.metrics = metrics
        self.writer = EventWriter(settings.database_url.get_secret_value(),
                                  settings.database_schema)
        self.status_of = {settings.topic(topics.COMPLETED): "completed",
                          settings.topic(topics.FAILED): "failed"}
        self.outcome_topic = settings.topic(topics.OUTCOME)
        self.consumer: AIOKafkaConsumer | None = None
        self.rows_written = 0
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        settings = self.settings
        # The sink waits up to sink_max_wait_ms for a batch anyway; a broker that does not wake
        # waiting fetches (the embedded one) is then polled 5x less often than at the route
        # agent's short fetch wait (measured: an idle 10 ms poller costs that broker ~11% of a
        # core and the client ~10%, at 50 ms ~4% and ~3%).
        options = group_consumer_options(
            settings, settings.sink_group, settings.sink_max_batch,
            fetch_max_wait_ms=max(settings.fetch_max_wait_ms, int(settings.sink_max_wait_ms)),
        )
        self.consumer = AIOKafkaConsumer(*self.status_of, self.outcome_topic, **options)
        await self.consumer.start()
        self.add_future(self._run())

    async def on_stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        await self.writer.stop()

    async def _run(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        while not self.should_stop:
            fetched = await self._next_batch(consumer)
            if fetched is None:
                continue
            await self._write_until_durable(fetched.records)
            await commit_or_warn(consumer, fetched.offsets, "sink_commit_failed")
            self._observe_lag(consumer, fetched.offsets)

    async def _next_batch(self, consumer: AIOKafkaConsumer) -> Fetched | None:
        """The first records that come, and what else arrives within `sink_max_wait_ms`.

        Why fill: on Kafka and Redpanda a fetch returns as soon as events arrive, so under a
        trickle every fetch brought a handful, and each handful cost a Postgres transaction
        and a commit (at 1,000 req/s about 200 of each a second). While the sink waits, the
        client holds at most one fetched response per partition and asks the broker for
        nothing more, so a batch costs about two fetches, one write and one commit. Rows land
        at most `sink_max_wait_ms` later. A fetch of a tenth of a batch or more, or one
        behind a partition's end (a backlog), is written at once: waiting there would only
        slow the catch-up. (The embedded broker answers a waiting fetch only when its wait
        expires, so there the sink batched by the window already; draining 40,000 requests
        there, the last rows landed up to one wait later, -3% on `sink_rows_per_s`.)
        """
        wait_ms = int(self.settings.sink_max_wait_ms)
        size = self.settings.sink_max_batch
        first = await fetch_or_warn(consumer, wait_ms, size, "sink_fetch_failed")
        if (first is None or len(first.records) * _FILL_BELOW >= size
                or any(partition_lag(consumer, first.offsets).values())):
            return first
        await asyncio.sleep(wait_ms / 1000)
        return first.then(
            await fetch_or_warn(consumer, 0, size - len(first.records), "sink_fetch_failed")
        )

    async def _write_until_durable(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        rows = rows_from_records(records, self.status_of)
        outcomes = outcome_rows(records, self.outcome_topic)
        self.metrics.batch_size.labels("sink").observe(len(rows))
        self.metrics.sink_lag.set(len(records))
        delay = _BACKOFF_START_S
        isolate = False
        while True:
            try:
                if isolate:
                    rows, outcomes = await self._isolate(rows, outcomes)
                    isolate = False
                await self.writer.write(rows)
                await self.writer.write_outcomes(outcomes)
                break
            except RowsRejected as exc:
                log.error("sink_batch_rejected", records=len(records), error=str(exc)[:300])
                isolate = True
            except DependencyUnavailable as exc:
                # Offsets stay uncommitted while Postgres is down, so nothing is lost; the
                # consumer stops fetching meanwhile, which is the backpressure we want.
                self.metrics.sink_retries.inc()
                log.warning("sink_write_failed", retry_in_s=delay, error=str(exc)[:200])
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)
                if self.should_stop:
                    raise
        self.rows_written += len(rows)
        for status, n in Counter(row[1] for row in rows).items():  # one inc per status
            self.metrics.sink_rows.labels(status).inc(n)
        if outcomes:
            self.metrics.sink_rows.labels("outcome").inc(len(outcomes))
        self.metrics.sink_lag.set(0)

    async def _isolate(
        self, rows: list[tuple[Any, ...]], outcomes: list[tuple[Any, ...]]
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Write a rejected batch row by row so one bad row cannot block the rest; rows that
        Postgres refuses are logged with their source and counted, then skipped. Outages
        still propagate (and are retried by the caller's next batch attempt)."""
        kept: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]] = ([], [])
        for write, batch, out in ((self.writer.write, rows, kept[0]),
                                  (self.writer.write_outcomes, outcomes, kept[1])):
            for row in batch:
                try:
                    await write([row])
                    out.append(row)
                except RowsRejected as exc:
                    self.metrics.sink_rows.labels("rejected").inc()
                    log.error("sink_row_rejected", request_id=str(row[0])[:256],
                              error=str(exc)[:300])
        return kept

    def _observe_lag(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        for (topic, partition), behind in partition_lag(consumer, offsets).items():
            self.metrics.consumer_lag.labels(self.settings.sink_group, topic,
                                             str(partition)).set(behind)
