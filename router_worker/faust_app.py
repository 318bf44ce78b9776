"""The Faust app (exposed as `router_worker.app`): route agent, sink service, web endpoints."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from functools import lru_cache
from typing import Any

import faust
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router_worker import topics
from router_worker.agents.outcome import consume_outcomes
from router_worker.agents.route import Outgoing
from router_worker.agents.runtime import RouteRuntime, inbound_from_event
from router_worker.agents.sink import SinkAgent
from router_worker.faust_tuning import set_fetch_max_wait
from router_worker.kafka import ssl_context
from router_worker.logs import configure_logging
from router_worker.metrics import Metrics, create_metrics
from router_worker.settings import Settings, get_settings

log = structlog.get_logger(__name__)

_PRODUCE_BACKOFF_MAX_S = 5.0
# Route-group lag is read from the consumer's own state (no broker request), so this is cheap.
_LAG_INTERVAL_S = 2.0


def broker_url(settings: Settings) -> str:
    """Faust's broker URL list from the bootstrap host:port list."""
    hosts = [h.strip() for h in settings.kafka_bootstrap.split(",") if h.strip()]
    return ";".join(f"kafka://{h}" for h in hosts)


def broker_credentials(settings: Settings) -> Any:
    """Faust credentials for SASL/TLS, or None for PLAINTEXT."""
    context = ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL"):
        password = settings.kafka_sasl_password
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password.get_secret_value() if password else None,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def faust_options(settings: Settings) -> dict[str, Any]:
    """Faust settings derived from ours; the short timeouts make group joins fast on the
    embedded broker (a JoinGroup waits half the session timeout there)."""
    return {
        "broker": broker_url(settings),
        "broker_credentials": broker_credentials(settings),
        "broker_session_timeout": settings.session_timeout_s,
        "broker_heartbeat_interval": settings.heartbeat_interval_s,
        "broker_commit_interval": settings.commit_interval_s,
        "broker_rebalance_timeout": max(settings.session_timeout_s * 2, 4.0),
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
        "producer_linger": 0.002,
        "producer_max_request_size": 4 * 1024 * 1024,
        "key_serializer": "raw",
        "value_serializer": "raw",
        "store": "memory://",
        "topic_partitions": settings.topic_partitions,
        "topic_replication_factor": 1,
        "web_port": settings.web_port,
        "web_host": "0.0.0.0",
        "autodiscover": False,
        "stream_buffer_maxsize": max(settings.max_batch * 4, 4096),
        "table_standby_replicas": 0,
    }


async def enqueue(app: faust.App, outgoing: list[Outgoing]) -> list[Awaitable[Any]]:
    """Hand a whole batch to the producer at once; one future per record."""
    return [
        await app.producer.send(o.topic, o.key, o.value, None, None, o.headers) for o in outgoing
    ]


async def deliver(
    app: faust.App, outgoing: list[Outgoing], futures: list[Awaitable[Any]] | None = None
) -> None:
    """Wait until the broker acknowledged every record; on failure resend the whole batch with
    backoff (duplicates are fine: the sink is idempotent), never skip it."""
    delay = 0.1
    while True:
        try:
            await asyncio.gather(
                *(futures if futures is not None else await enqueue(app, outgoing))
            )
            return
        except Exception as exc:  # any produce failure: back off and resend the whole batch
            log.error(
                "produce_failed", records=len(outgoing), retry_in_s=delay, error=repr(exc)[:300]
            )
            futures = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, _PRODUCE_BACKOFF_MAX_S)


async def confirm(
    app: faust.App,
    stream: Any,
    events: list[Any],
    outgoing: list[Outgoing],
    futures: list[Awaitable[Any]],
    previous: asyncio.Future[None] | None = None,
) -> None:
    """Acknowledge a batch's input offsets only once its outputs are durable on the broker,
    and never before the previous batch's: Faust may commit a run of acked offsets that does
    not start at the committed one, so out-of-order acks could skip an undelivered record."""
    await deliver(app, outgoing, futures)
    if previous is not None:
        await asyncio.wait([previous])
    for event in events:
        await stream.ack(event)


class BatchPump:
    """Routes batches in a task of its own so Faust keeps filling the next batch meanwhile,
    and keeps up to `depth` routed batches awaiting broker acknowledgement.

    Deliveries overlap; acknowledgements happen strictly in batch order (see `confirm`).
    """

    def __init__(self, app: faust.App, stream: Any, runtime: RouteRuntime, depth: int) -> None:
        self.app = app
        self.stream = stream
        self.runtime = runtime
        self.depth = depth
        self.queue: asyncio.Queue[list[Any] | None] = asyncio.Queue(maxsize=depth)
        self.inflight: deque[asyncio.Future[None]] = deque()
        self.worker = asyncio.ensure_future(self._work())

    async def submit(self, events: list[Any]) -> None:
        """Queue a batch; blocks (backpressure on the stream) while `depth` batches wait."""
        if self.worker.done():
            self.worker.result()  # re-raise what stopped the pump: never route into a void
        await self.queue.put(events)

    async def drain(self) -> None:
        """Finish queued batches and their confirmations."""
        if not self.worker.done():
            await self.queue.put(None)
        await asyncio.gather(self.worker, return_exceptions=True)
        await asyncio.gather(*self.inflight, return_exceptions=True)

    async def _work(self) -> None:
        while (events := await self.queue.get()) is not None:
            self.runtime.maybe_reload()
            outgoing = await self.runtime.route([inbound_from_event(e) for e in events])
            futures = await enqueue(self.app, outgoing)
            previous = self.inflight[-1] if self.inflight else None
            self.inflight.append(
                asyncio.ensure_future(
                    confirm(self.app, self.stream, events, outgoing, futures, previous)
                )
            )
            while self.inflight and (self.inflight[0].done() or len(self.inflight) > self.depth):
                await self.inflight.popleft()


def create_app(settings: Settings) -> faust.App:
    """A Faust app wired with the route agent and, unless disabled, the sink."""
    configure_logging(settings)
    set_fetch_max_wait(settings.fetch_max_wait_ms)
    app = faust.App(settings.app_id, **faust_options(settings))
    metrics = create_metrics()
    requested = app.topic(
        settings.topic(topics.REQUESTED),
        key_type=bytes,
        value_type=bytes,
        partitions=settings.topic_partitions,
    )
    state: dict[str, Any] = {"runtime": None}

    @app.agent(requested, name="route")
    async def route(stream: Any) -> None:
        runtime = await RouteRuntime.start(settings, metrics)
        state["runtime"] = runtime
        pump = BatchPump(app, stream, runtime, settings.max_inflight_batches)
        try:
            async for events in stream.noack_take(
                settings.max_batch, within=settings.max_wait_ms / 1000
            ):
                await pump.submit(list(events))
        finally:
            # Drain on shutdown: what is acknowledged by then is committed; the rest is
            # re-read after restart (at-least-once), never skipped.
            await pump.drain()
            state["runtime"] = None
            await runtime.stop()

    if settings.run_outcomes:
        outcomes = app.topic(
            settings.topic(topics.OUTCOME),
            key_type=bytes,
            value_type=bytes,
            partitions=settings.topic_partitions,
        )

        @app.agent(outcomes, name="outcome")
        async def outcome(stream: Any) -> None:
            await consume_outcomes(stream, settings, metrics, lambda out: deliver(app, out))

    if settings.run_sink:
        # Faust accepts a ready service instance here; its annotation only names classes.
        app.service(SinkAgent(settings, metrics))  # type: ignore[arg-type]
    _register_pages(app, metrics, state)
    _register_lag_timer(app, metrics, settings.app_id)
    return app


def route_lag(consumer: Any, internal_prefix: str) -> dict[tuple[str, int], int]:
    """Records behind the partition end per assigned partition, from what the consumer already
    knows (highwater from the last fetch, committed offset): no broker round trip. Faust's own
    topics (`<app id>-...`, e.g. the assignor's leader topic) are left out."""
    lag: dict[tuple[str, int], int] = {}
    for tp in consumer.assignment():
        if tp.topic.startswith(internal_prefix):
            continue
        high = consumer.highwater(tp)
        if high is None:
            continue
        committed = consumer._committed_offset.get(tp)
        if committed is None:
            read = consumer._read_offset.get(tp)
            committed = read + 1 if read is not None else 0
        lag[(tp.topic, tp.partition)] = max(int(high) - int(committed), 0)
    return lag


def _register_lag_timer(app: faust.App, metrics: Metrics, group: str) -> None:
    reported: set[tuple[str, int]] = set()

    async def observe_lag() -> None:
        try:
            lag = route_lag(app.consumer, f"{group}-")
        except Exception as exc:  # a metrics probe must never stop the worker
            log.debug("lag_probe_failed", error=repr(exc)[:200])
            return
        gauge = metrics.consumer_lag
        for topic, partition in reported - lag.keys():  # revoked: stop reporting stale lag
            gauge.remove(group, topic, str(partition))
        for (topic, partition), behind in lag.items():
            gauge.labels(group, topic, str(partition)).set(behind)
        reported.clear()
        reported.update(lag)

    app.timer(interval=_LAG_INTERVAL_S, name="route-consumer-lag")(observe_lag)


def _register_pages(app: faust.App, metrics: Metrics, state: dict[str, Any]) -> None:
    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        # aiohttp wants the charset separately; Prometheus' exposition format is UTF-8 text.
        content_type = CONTENT_TYPE_LATEST.split(";")[0] + "; version=0.0.4"
        return web.bytes(generate_latest(metrics.registry), content_type=content_type)

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        runtime = state["runtime"]
        ready = runtime is not None
        body = {"ready": ready, "classifier_version": runtime.version if ready else None}
        return web.json(body, status=200 if ready else 503)


@lru_cache(maxsize=1)
def get_app() -> faust.App:
    """The process-wide app, built from the environment's settings."""
    return create_app(get_settings())
