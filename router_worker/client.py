"""Python client: publish requests and await their decisions over the topics.

```python
async with RoutingClient(settings) as client:
    reply = await client.route("Write a haiku about Kafka", tenant="acme", timeout=5)
    if reply.status == "completed":
        model = reply.decision["model"]
    await client.report_outcome(reply.request_id, model, success=True, latency_ms=840)
```
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from router_worker import topics
from router_worker.errors import DependencyUnavailable, RouterError
from router_worker.events import utcnow
from router_worker.kafka import consumer_options, producer_options
from router_worker.settings import Settings

log = structlog.get_logger(__name__)

_READ_BACKOFF_S = 0.5


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
        """The id of the request this event answers."""
        return str(self.event["request_id"])

    @property
    def decision(self) -> dict[str, Any] | None:
        """The `decision` object of a completed event; None for a failure."""
        decision = self.event.get("decision") if self.status == "completed" else None
        return decision if isinstance(decision, dict) else None


class RoutingClient:
    """Request/reply over Kafka: one producer, one shared reply consumer, many waiters.

    The reply consumer has no group: it reads every partition of the completed and failed
    topics from their end at `start()`, and resolves the future registered for each
    request_id (`expect`). Any number of concurrent `route()` calls share it; a reply for a
    request nobody waits for is skipped without being parsed. `stop()` (or leaving the
    `async with` block) cancels every pending waiter.
    """

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
            await self._consumer.stop()
            await self._producer.stop()
            raise RouterError(f"topics {self._completed}/{self._failed} not found: run "
                              "`router-worker topics apply` first")
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve positions now, before any request is sent
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read_replies(), name="routing-client-replies")

    async def stop(self) -> None:
        """Stop reading and close both clients; pending waiters are cancelled. Idempotent."""
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
            try:
                batches = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            except KafkaError as exc:
                # A broker hiccup must not kill the one reader every waiter depends on.
                log.warning("client_reply_fetch_failed", error=repr(exc)[:200])
                await asyncio.sleep(_READ_BACKOFF_S)
                continue
            if not self._waiters:
                continue
            for records in batches.values():
                for record in records:
                    self._resolve(record.topic, record.key, record.value or b"")

    def _resolve(self, topic: str, key: bytes | None, value: bytes) -> None:
        # Terminal events are keyed by request_id: look the waiter up by key first, so replies
        # meant for other callers are never parsed.
        if key is not None:
            waiter = self._waiters.get(key.decode("utf-8", errors="replace"))
            if waiter is None:
                return
        try:
            event = orjson.loads(value)
            rid = str(event["request_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        waiter = self._waiters.pop(rid, None)
        if waiter is not None and not waiter.done():
            status = "completed" if topic == self._completed else "failed"
            waiter.set_result(Reply(status, event))

    async def publish(
        self, prompt: str | None = None, *, tenant: str = "default", request_id: str | None = None,
        session_id: str | None = None, headers: dict[str, str] | None = None,
        payload: dict[str, Any] | bytes | None = None, **fields: Any,
    ) -> str:
        """Fire and forget: publish a request and return its request_id.

        `fields` become top-level request fields (`task_hint`, `constraints`, `metadata`, ...);
        `payload` replaces the whole body (bytes are sent as they are, e.g. to test bad input);
        `headers` (e.g. `traceparent`, `correlation_id`) travel to every event it causes.
        Returns once the broker acknowledged the record.
        """
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
        """A future resolved with the terminal event of `request_id`.

        Register it before publishing, or a fast reply may arrive before anyone waits for it.
        Callers expecting the same id share one future.
        """
        waiter = self._waiters.get(request_id)
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[request_id] = waiter
        return waiter

    async def route(self, prompt: str, *, tenant: str = "default", timeout: float = 10.0,
                    **fields: Any) -> Reply:
        """Publish a request and wait for its terminal event: a `Reply` with status "completed"
        (see `Reply.decision`) or "failed" (`error_code`); RoutingTimeout after `timeout` s.
        Other keyword arguments are passed to `publish`."""
        rid = fields.pop("request_id", None) or str(uuid.uuid4())
        waiter = self.expect(rid)
        try:
            await self.publish(prompt, tenant=tenant, request_id=rid, **fields)
        except BaseException:
            self._forget(rid, waiter)
            raise
        return await self.wait(rid, waiter, timeout)

    async def wait(self, request_id: str, waiter: asyncio.Future[Reply], timeout: float) -> Reply:
        """Wait for a registered reply; RoutingTimeout with a clear message when none comes."""
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError as exc:
            raise RoutingTimeout(
                f"no decision for request {request_id} within {timeout:.1f}s: nothing arrived "
                f"on {self._completed} or {self._failed}. Is a worker running and consuming "
                f"{self.settings.topic(topics.REQUESTED)} at {self.settings.kafka_bootstrap}?"
            ) from exc
        finally:
            self._forget(request_id, waiter)

    def _forget(self, request_id: str, waiter: asyncio.Future[Reply]) -> None:
        if self._waiters.get(request_id) is waiter:
            del self._waiters[request_id]

    async def report_outcome(self, request_id: str, model: str, *, success: bool,
                             latency_ms: float, **fields: Any) -> None:
        """Publish a `routing.outcome.v1` event for a decision the caller used.

        `fields` are the optional outcome fields: `tenant_id`, `input_tokens`,
        `output_tokens`, `cost_usd`, `category`, `label` (the category that was right).
        """
        body = {"request_id": request_id, "model": model, "success": success,
                "latency_ms": latency_ms, "reported_at": utcnow(), **fields}
        await self._producer.send_and_wait(self.settings.topic(topics.OUTCOME),
                                           orjson.dumps(body), key=request_id.encode())
