"""The Faust app (exposed as `router_worker.app`): route agent, outcome agent, sink, web."""

from __future__ import annotations

from collections.abc import Awaitable
from functools import lru_cache, partial
from typing import Any

import faust
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router_worker import topics
from router_worker.agents.ingest import RouteAgent, deliver, per_record
from router_worker.agents.outcome import consume_outcomes
from router_worker.agents.route import Outgoing
from router_worker.agents.sink import SinkAgent
from router_worker.faust_tuning import set_fetch_max_wait
from router_worker.kafka import partition_lag, ssl_context
from router_worker.logs import configure_logging
from router_worker.metrics import Metrics, create_metrics
from router_worker.settings import Settings, get_settings

log = structlog.get_logger(__name__)

# Consumer lag is read from the consumer's own state (no broker request), so this is cheap.
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
        "broker_rebalance_timeout": settings.rebalance_timeout_s,
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


def create_app(settings: Settings) -> faust.App:
    """A Faust app wired with the route agent and, unless disabled, the sink."""
    configure_logging(settings)
    # Faust's consumer now carries only the outcome agent, whose records are not urgent.
    set_fetch_max_wait(settings.outcome_fetch_max_wait_ms)
    # The route consumer group is `app_id` (see RouteAgent); Faust's own consumer group, which
    # only carries the outcome agent, must differ: the two speak different group protocols.
    app = faust.App(faust_app_id(settings), **faust_options(settings))
    metrics = create_metrics()
    router = RouteAgent(settings, metrics)
    # Faust accepts a ready service instance here; its annotation only names classes.
    app.service(router)  # type: ignore[arg-type]

    if settings.run_outcomes:
        outcomes = app.topic(
            settings.topic(topics.OUTCOME),
            key_type=bytes,
            value_type=bytes,
            partitions=settings.topic_partitions,
        )

        @app.agent(outcomes, name="outcome")
        async def outcome(stream: Any) -> None:
            produce = per_record(partial(faust_send, app))
            await consume_outcomes(stream, settings, metrics, lambda out: deliver(produce, out))

    if settings.run_sink:
        # Faust accepts a ready service instance here; its annotation only names classes.
        app.service(SinkAgent(settings, metrics))  # type: ignore[arg-type]
    _register_pages(app, metrics, router)
    _register_lag_timer(app, metrics, router)
    return app


def faust_app_id(settings: Settings) -> str:
    """Faust's app id and consumer group (the outcome agent's): `<app_id>-outcome`."""
    return f"{settings.app_id}-outcome"


async def faust_send(app: faust.App, o: Outgoing) -> Awaitable[Any]:
    """Produce one record with the Faust app's producer; returns its delivery future."""
    return await app.producer.send(o.topic, o.key, o.value, None, None, o.headers)


def faust_consumer_lag(consumer: Any, internal_prefix: str) -> dict[tuple[str, int], int]:
    """Lag of the Faust consumer (the outcome agent) per assigned partition, from its committed
    offset, else its read position. Faust's own topics (`<app id>-...`, e.g. the assignor's
    leader topic) are left out."""
    positions: dict[Any, int] = {}
    for tp in consumer.assignment():
        if tp.topic.startswith(internal_prefix):
            continue
        committed = consumer._committed_offset.get(tp)
        if committed is None:
            read = consumer._read_offset.get(tp)
            committed = read + 1 if read is not None else 0
        positions[tp] = committed
    return partition_lag(consumer, positions)


def _register_lag_timer(app: faust.App, metrics: Metrics, router: RouteAgent) -> None:
    reported: set[tuple[str, str, int]] = set()
    faust_group = app.conf.id

    async def observe_lag() -> None:
        try:
            lag = {(router.settings.app_id, t, p): n for (t, p), n in router.lag().items()}
            outcome_lag = faust_consumer_lag(app.consumer, f"{faust_group}-")
            lag.update({(faust_group, t, p): n for (t, p), n in outcome_lag.items()})
        except Exception as exc:  # a metrics probe must never stop the worker
            log.debug("lag_probe_failed", error=repr(exc)[:200])
            return
        gauge = metrics.consumer_lag
        for group, topic, partition in reported - lag.keys():  # revoked: stop reporting it
            gauge.remove(group, topic, str(partition))
        for (group, topic, partition), behind in lag.items():
            gauge.labels(group, topic, str(partition)).set(behind)
        reported.clear()
        reported.update(lag)

    app.timer(interval=_LAG_INTERVAL_S, name="consumer-lag")(observe_lag)


def _register_pages(app: faust.App, metrics: Metrics, router: RouteAgent) -> None:
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
        runtime = router.runtime
        version = runtime.version if runtime is not None else None
        body = {"ready": runtime is not None, "classifier_version": version}
        return web.json(body, status=200 if runtime is not None else 503)


@lru_cache(maxsize=1)
def get_app() -> faust.App:
    """The process-wide app, built from the environment's settings."""
    return create_app(get_settings())
