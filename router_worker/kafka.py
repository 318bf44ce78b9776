"""aiokafka client options derived from settings (bootstrap, SASL, TLS) in one place."""

from __future__ import annotations

import ssl
from typing import Any

from router_worker.settings import Settings


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """A TLS context when the security protocol needs one."""
    if settings.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
    return ssl.create_default_context(cafile=cafile)


def client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments shared by every aiokafka producer, consumer and admin client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": settings.kafka_security_protocol,
    }
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        password = settings.kafka_sasl_password
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=password.get_secret_value() if password else None,
        )
    return options


def consumer_options(settings: Settings) -> dict[str, Any]:
    """Consumer options: the shared ones plus a short fetch wait (see `fetch_max_wait_ms`)."""
    return {**client_options(settings), "fetch_max_wait_ms": settings.fetch_max_wait_ms}


def producer_options(settings: Settings) -> dict[str, Any]:
    """Producer options: acks from all replicas, no idempotence (the embedded broker lacks
    InitProducerId; at-least-once plus the idempotent sink gives effectively-once)."""
    return {
        **client_options(settings),
        "acks": "all",
        "enable_idempotence": False,
        "linger_ms": 2,
        "max_request_size": 4 * 1024 * 1024,
    }
