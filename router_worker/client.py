"""Python client: publish requests and await their decisions over the topics."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from router_worker import topics
from router_worker.errors import DependencyUnavailable, RouterError
from router_worker.events import utcnow
from router_worker.kafka import consumer_options, producer_options
from router_worker.settings import Settings


class RoutingTimeout(RouterError):
    """No terminal event arrived for a request within the timeout."""

    code = "routing_timeout"
    retriable = True


@dataclass(frozen=True)
class Reply:
    """The terminal event for a request: status plus the event body."""

    status: str  # "completed" | "failed"
    event: dict[str, Any]

    @property
    def request_id(self) -> str:
        return str(self.event["request_id"])


class RoutingClient:
    """Request/reply over Kafka: one producer, one shared reply consumer, many waiters."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._completed = settings.topic(topics.COMPLETED)
        self._failed = settings.topic(topics.FAILED)
        self._producer = AIOKafkaProducer(**producer_options(settings))
        self._consumer = AIOKafkaConsumer(**consumer_options(settings), enable_auto_commit=False,
                                          group_id=None, auto_offset_reset="latest")
        self._waiters: dict[str, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RoutingClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, and position the reply consumer at the end of both reply topics."""
        try:
            await self._producer.start()
            await self._consumer.start()
        except KafkaError as exc:
            await self._consumer.stop()
            await self._producer.stop()
            raise DependencyUnavailable(
                f"cannot reach Kafka at {self.settings.kafka_bootstrap}: {exc}"
            ) from exc
        partitions = []
        for topic in (self._completed, self._failed):
            await self._consumer.topics()  # refreshes cluster metadata
            found = self._consumer.partitions_for_topic(topic) or set()
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        if not partitions:
            raise RouterError(f"topics {self._completed}/{self._failed} not found: run "
                              "`router-worker topics apply` first")
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve positions now, before any request is sent
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read_replies(), name="routing-client-replies")

    async def stop(self) -> None:
        """Stop reading and close both clients; pending waiters are cancelled."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()
        await self._consumer.stop()
        await self._producer.stop()

    async def _read_replies(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            for records in batches.values():
                for record in records:
                    self._resolve(record.topic, record.value or b"")

    def _resolve(self, topic: str, value: bytes) -> None:
        try:
            event = orjson.loads(value)
            waiter = self._waiters.pop(str(event["request_id"]), None)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if waiter is not None and not waiter.done():
            status = "completed" if topic == self._completed else "failed"
            waiter.set_result(Reply(status, event))

    async def publish(
        self, prompt: str | None = None, *, tenant: str = "default", request_id: str | None = None,
        session_id: str | None = None, headers: dict[str, str] | None = None,
        payload: dict[str, Any] | bytes | None = None, **fields: Any,
    ) -> str:
        """Fire and forget: publish a request (or a raw payload) and return its request_id."""
        rid = request_id or str(uuid.uuid4())
        if isinstance(payload, bytes):
            value = payload
        else:
            body: dict[str, Any] = dict(payload or {})
            if payload is None:
                body = {"request_id": rid, "tenant_id": tenant, "prompt": prompt,
                        "created_at": utcnow(), **fields}
                if session_id is not None:
                    body["session_id"] = session_id
            value = orjson.dumps(body)
        kafka_headers = [(k, v.encode()) for k, v in (headers or {}).items()]
        await self._producer.send_and_wait(self.settings.topic(topics.REQUESTED), value,
                                           key=rid.encode(), headers=kafka_headers or None)
        return rid

    def expect(self, request_id: str) -> asyncio.Future[Reply]:
        """A future resolved by the terminal event of `request_id` (register before publishing)."""
        waiter = self._waiters.get(request_id)
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[request_id] = waiter
        return waiter

    async def route(self, prompt: str, *, tenant: str = "default", timeout: float = 10.0,
                    **fields: Any) -> Reply:
        """Publish a request and wait for its decision (or failure)."""
        rid = fields.pop("request_id", None) or str(uuid.uuid4())
        waiter = self.expect(rid)
        await self.publish(prompt, tenant=tenant, request_id=rid, **fields)
        return await self.wait(rid, waiter, timeout)

    async def wait(self, request_id: str, waiter: asyncio.Future[Reply], timeout: float) -> Reply:
        """Wait for a registered reply; RoutingTimeout with a clear message when none comes."""
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError as exc:
            self._waiters.pop(request_id, None)
            raise RoutingTimeout(
                f"no decision for request {request_id} within {timeout:.1f}s: is a worker "
                f"running against {self.settings.kafka_bootstrap}?"
            ) from exc

    async def report_outcome(self, request_id: str, model: str, *, success: bool,
                             latency_ms: float, **fields: Any) -> None:
        """Publish a `routing.outcome.v1` event for a decision the caller used."""
        body = {"request_id": request_id, "model": model, "success": success,
                "latency_ms": latency_ms, "reported_at": utcnow(), **fields}
        await self._producer.send_and_wait(self.settings.topic(topics.OUTCOME),
                                           orjson.dumps(body), key=request_id.encode())
