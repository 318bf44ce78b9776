"""The route agent's Kafka side: micro-batches from aiokafka, batched produce, ordered commits.

It runs as a service of the Faust app (`faust -A router_worker worker` starts it, Faust's web
server serves its metrics and readiness), but reads `routing.requested.v1` with its own aiokafka
consumer instead of a Faust stream. Faust's per-event stream machinery (event objects, sensors,
per-record acks, a consumer thread competing for the GIL) capped the whole worker near 2,000
requests/s on two cores; `getmany` hands over a whole fetch as one list, so the per-request
cost is our own routing work (see benchmarks/README.md).

Delivery: a batch's offsets are committed only after every record it produced is acknowledged
by the broker, and strictly in batch order (coalesced to one commit per `commit_interval_s`);
on a rebalance and on shutdown everything routed is delivered and committed before the
partitions are released. A crash re-reads what was not committed (at-least-once; the sink is
idempotent on request_id).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from mode import Service

from router_worker import topics
from router_worker.agents.route import Outgoing
from router_worker.agents.runtime import RouteRuntime
from router_worker.kafka import (
    commit_or_warn,
    fetch_or_warn,
    group_consumer_options,
    key_partition,
    partition_lag,
    producer_options,
)
from router_worker.logs import quiet_kafka_client_logs
from router_worker.metrics import Metrics
from router_worker.settings import Settings
from router_worker.validate import Inbound

log = structlog.get_logger(__name__)

_PRODUCE_BACKOFF_MAX_S = 5.0
# Record batches of a routed micro-batch: one per partition for up to ~700 decisions, and under
# the brokers' default message size limit (1 MiB on Kafka and Redpanda).
_RECORD_BATCH_BYTES = 512 * 1024

Send = Callable[[Outgoing], Awaitable[Awaitable[Any]]]
# Queues a whole batch for producing; returns the delivery futures to await.
Produce = Callable[[Sequence[Outgoing]], Awaitable[list[Awaitable[Any]]]]


def per_record(send: Send) -> Produce:
    """A Produce that hands records to `send` one at a time (one delivery future each)."""

    async def produce(outgoing: Sequence[Outgoing]) -> list[Awaitable[Any]]:
        return [await send(o) for o in outgoing]

    return produce


class BatchProduce:
    """Produce a routed batch as one record batch per partition: one future per partition
    batch instead of one per record, and no per-record trip through the producer's
    accumulator. Keys go to the partitions aiokafka's (Kafka's) default partitioner picks,
    the same as a per-record send, so a request's events keep their partition."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def __call__(self, outgoing: Sequence[Outgoing]) -> list[Awaitable[Any]]:
        producer = self.producer
        partitions: dict[str, list[int]] = {}
        for topic in dict.fromkeys(o.topic for o in outgoing):
            partitions[topic] = sorted(await producer.partitions_for(topic))
        groups: dict[tuple[str, int], list[Outgoing]] = {}
        for o in outgoing:
            owned = partitions[o.topic]
            groups.setdefault((o.topic, key_partition(o.key, owned)), []).append(o)
        futures: list[Awaitable[Any]] = []
        for (topic, partition), records in groups.items():
            batch = producer.create_batch()
            for o in records:
                if batch.append(key=o.key, value=o.value, timestamp=None, headers=o.headers):
                    continue
                # Full: send it and start the next one (a record always fits an empty batch).
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                batch.append(key=o.key, value=o.value, timestamp=None, headers=o.headers)
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        return futures


async def deliver(
    produce: Produce, outgoing: Sequence[Outgoing], futures: list[Awaitable[Any]] | None = None
) -> None:
    """Wait until the broker acknowledged every record; on failure resend the whole batch with
    backoff (duplicates are fine: the sink is idempotent), never skip it."""
    delay = 0.1
    while True:
        try:
            pending = futures if futures is not None else await produce(outgoing)
            await asyncio.gather(*pending)
            return
        except Exception as exc:  # any produce failure: back off and resend the whole batch
            log.error(
                "produce_failed", records=len(outgoing), retry_in_s=delay, error=repr(exc)[:300]
            )
            futures = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, _PRODUCE_BACKOFF_MAX_S)


def inbound_from_record(record: Any) -> Inbound:
    """Our view of an aiokafka record: raw bytes and where they came from."""
    return Inbound(
        value=record.value,
        key=record.key,
        headers=tuple((str(k), bytes(v or b"")) for k, v in record.headers) if record.headers
        else (),
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=float(record.timestamp or 0),
    )


class _DrainOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Before partitions move, finish and commit everything routed from them."""

    def __init__(self, agent: RouteAgent) -> None:
        self.agent = agent

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Bounded: the whole group waits for this callback. Past the bound the batches still
        # finish (shielded), their commits may then fail, and the next owner re-reads them.
        bound = self.agent.settings.session_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(self.agent.quiesce()), timeout=bound)
        except TimeoutError:
            log.warning("route_revoke_drain_timeout", seconds=bound)
        log.info("route_partitions_revoked", partitions=len(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.agent.forget_revoked(assigned)
        log.info("route_partitions_assigned", partitions=len(assigned))


class RouteAgent(Service):
    """Consumes requests in micro-batches, routes them, produces decisions, commits."""

    def __init__(self, settings: Settings, metrics: Metrics, **kwargs: Any) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtime: RouteRuntime | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._produce: Produce | None = None
        # Batches between fetch and commit (route, deliver, commit), in fetch order.
        self.inflight: deque[asyncio.Future[None]] = deque()
        # Held from a fetch until its batch is queued: a revocation waits for it.
        self._batch_lock = asyncio.Lock()
        self._routing = asyncio.Semaphore(settings.route_concurrency)
        self._loop_done = asyncio.Event()
        self.committed: dict[TopicPartition, int] = {}
        # Offsets of delivered batches not committed yet: commits go out at most every
        # commit_interval_s (a commit costs the client and the broker ~0.5 ms of CPU each, and
        # at a few hundred small batches a second that was a fifth of a core), and at once on
        # a revocation and on shutdown. One commit at a time, so offsets never go backwards.
        self._to_commit: dict[TopicPartition, int] = {}
        self._commit_lock = asyncio.Lock()
        self._last_commit = 0.0
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        settings = self.settings
        # Here rather than at import: Faust configures logging between the two.
        quiet_kafka_client_logs(settings)
        self.runtime = await RouteRuntime.start(settings, self.metrics)
        # No linger: BatchProduce hands over whole record batches, and a lingering batch would
        # only hold each routed batch back (up to linger_ms) before it leaves.
        self.producer = AIOKafkaProducer(
            **{**producer_options(settings), "max_batch_size": _RECORD_BATCH_BYTES,
               "linger_ms": 0}
        )
        await self.producer.start()
        # The output topics' metadata now, not on the first batch's produce.
        for topic in (topics.COMPLETED, topics.FAILED):
            await self.producer.partitions_for(settings.topic(topic))
        self._produce = BatchProduce(self.producer)
        self.consumer = AIOKafkaConsumer(
            **group_consumer_options(settings, settings.app_id, settings.max_batch),
            rebalance_timeout_ms=int(settings.rebalance_timeout_s * 1000),
        )
        self.consumer.subscribe([settings.topic(topics.REQUESTED)], listener=_DrainOnRevoke(self))
        await self.consumer.start()
        self.add_future(self._run())

    async def on_stop(self) -> None:
        # Graceful drain: the loop stops after its current batch, then every routed batch is
        # delivered and committed before the consumer leaves the group.
        if self.consumer is not None:
            try:
                await asyncio.wait_for(self._loop_done.wait(), timeout=30)
            except TimeoutError:
                log.error("route_drain_timeout")
            await self.quiesce()
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()
        if self.runtime is not None:
            await self.runtime.stop()
            self.runtime = None

    async def quiesce(self) -> None:
        """Wait until every fetched batch is routed, delivered and committed."""
        async with self._batch_lock:
            await asyncio.gather(*self.inflight, return_exceptions=True)
            self.inflight.clear()
            await self.flush_commits()

    async def flush_commits(self) -> None:
        """Commit the offsets of every delivered batch now."""
        async with self._commit_lock:
            offsets, self._to_commit = self._to_commit, {}
            self._last_commit = time.monotonic()
            if offsets:
                await self._commit(offsets)

    def forget_revoked(self, assigned: list[TopicPartition]) -> None:
        """Drop the lag bookkeeping of partitions this worker no longer owns.

        No broker request here: a rebalance callback that waits on the broker can stall the
        whole group's rebalance.
        """
        self.committed = {tp: n for tp, n in self.committed.items() if tp in assigned}
        self._to_commit = {tp: n for tp, n in self._to_commit.items() if tp in assigned}

    async def _run(self) -> None:
        try:
            while not self.should_stop:
                await self._step()
                if self._to_commit and self._commit_due():  # traffic stopped: commit the rest
                    await self.flush_commits()
        finally:
            self._loop_done.set()

    async def _step(self) -> None:
        # The lock spans fetch to queueing, so a revocation (`quiesce`) sees every fetched
        # batch in `inflight` and no new fetch starts until it is done.
        async with self._batch_lock:
            assert self.consumer is not None
            fetched = await fetch_or_warn(
                self.consumer, int(self.settings.max_wait_ms), self.settings.max_batch,
                "route_fetch_failed",
            )
            if fetched is None:
                return
            previous = self.inflight[-1] if self.inflight else None
            self.inflight.append(
                asyncio.ensure_future(self._handle(fetched.records, fetched.offsets, previous))
            )
        # Backpressure: at most `depth` batches between fetch and commit.
        depth = self.settings.max_inflight_batches
        while self.inflight and (self.inflight[0].done() or len(self.inflight) > depth):
            await self.inflight.popleft()

    async def _handle(
        self, records: list[Any], offsets: dict[TopicPartition, int],
        previous: asyncio.Future[None] | None,
    ) -> None:
        """Route, produce and commit one batch. Up to `route_concurrency` batches route at
        once (one waits on Redis, or on vLLM's thread, while another decides), but each
        commits only after the batch fetched before it: offsets never run ahead of output."""
        assert self.runtime is not None
        assert self._produce is not None
        async with self._routing:
            self.runtime.maybe_reload()
            outgoing = await self.runtime.route([inbound_from_record(r) for r in records])
            futures = await self._produce(outgoing)
        await deliver(self._produce, outgoing, futures)
        if previous is not None:
            await asyncio.wait([previous])
        self._to_commit.update(offsets)
        if self._commit_due():
            await self.flush_commits()

    def _commit_due(self) -> bool:
        return time.monotonic() - self._last_commit >= self.settings.commit_interval_s

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert self.consumer is not None
        if await commit_or_warn(self.consumer, offsets, "route_commit_failed"):
            self.committed.update(offsets)

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind the partition end per assigned partition, from what the consumer
        already knows (highwater from the last fetch, our last commit): no broker request.
        A partition appears once this worker has committed on it."""
        if self.consumer is None:
            return {}
        return partition_lag(self.consumer, self.committed)  # leaves out revoked partitions
