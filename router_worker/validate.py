"""Stage 1: decode, validate and size-limit raw request bytes; bad input becomes a failure."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from router_worker.errors import ErrorCode
from router_worker.events import RoutingRequested
from router_worker.frozen import frozen

# Undecodable payloads are kept (base64) for forensics, but a multi-megabyte blob would make the
# failed event itself too large to publish; beyond this the raw copy is truncated and says so.
MAX_RAW_COPY = 256 * 1024
# Parsing cost is linear in size; a payload this far beyond the prompt limit cannot be valid.
_RAW_SLACK = 64 * 1024


@frozen
class Inbound:
    """One record as it came off `routing.requested.v1`."""

    value: bytes | None
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    topic: str
    partition: int
    offset: int
    timestamp_ms: float


@frozen
class Rejected:
    """A record that cannot be routed, with everything its failed event needs."""

    request_id: str
    tenant_id: str | None
    error_code: ErrorCode
    error_detail: str
    raw: str | None
    created_at: datetime | None = None


def identify(inbound: Inbound, parsed: Any = None) -> str:
    """Best identity of a record: its request_id, else its key, else topic:partition:offset."""
    if isinstance(parsed, dict):
        rid = parsed.get("request_id")
        if isinstance(rid, str) and rid.strip():
            return rid[:256]
    if inbound.key:
        key = inbound.key.decode("utf-8", errors="replace").strip()
        if key:
            return key[:256]
    return f"{inbound.topic}:{inbound.partition}:{inbound.offset}"


def _raw_copy(value: bytes) -> str:
    return base64.b64encode(value[:MAX_RAW_COPY]).decode("ascii")


def _tenant_of(parsed: Any) -> str | None:
    if isinstance(parsed, dict):
        tenant = parsed.get("tenant_id")
        if isinstance(tenant, str) and tenant:
            return tenant[:256]
    return None


def _schema_detail(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def decode(inbound: Inbound, max_prompt_bytes: int) -> RoutingRequested | Rejected:
    """Turn raw bytes into a valid request, or into a Rejected with a stable error code."""
    value = inbound.value or b""
    if len(value) > max_prompt_bytes * 4 + _RAW_SLACK:
        return Rejected(
            identify(inbound), None, ErrorCode.TOO_LARGE,
            f"message is {len(value)} bytes; prompt limit is {max_prompt_bytes} bytes "
            f"(raw copy truncated to {MAX_RAW_COPY} bytes)",
            _raw_copy(value),
        )
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Rejected(identify(inbound), None, ErrorCode.INVALID_JSON, str(exc)[:500],
                        _raw_copy(value))
    try:
        request = RoutingRequested.model_validate(parsed)
    except ValidationError as exc:
        return Rejected(identify(inbound, parsed), _tenant_of(parsed), ErrorCode.SCHEMA_VIOLATION,
                        _schema_detail(exc), _raw_copy(value))
    size = len(request.text().encode("utf-8", errors="surrogatepass"))
    if size > max_prompt_bytes:
        return Rejected(request.request_id, request.tenant_id, ErrorCode.TOO_LARGE,
                        f"prompt text is {size} bytes; limit is {max_prompt_bytes} bytes",
                        None, request.created_at)
    return request
