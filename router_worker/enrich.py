"""Stage 2: enrich a micro-batch from Redis in one pipelined round trip."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

import orjson
import redis.asyncio as aioredis
import structlog
from pydantic import ValidationError
from redis.exceptions import RedisError

from router_worker.config import RoutingConfig, TenantSpec
from router_worker.events import RoutingRequested

log = structlog.get_logger(__name__)

# After a failed round trip, skip Redis for this long: during an outage every batch would
# otherwise pay the connect timeout before deciding with defaults.
_RETRY_AFTER_S = 1.0
HEALTH_DOWN = "down"


@dataclass(frozen=True)
class Keys:
    """Every Redis key the router reads or writes, under one prefix."""

    prefix: str

    def tenant(self, tenant_id: str) -> str:
        return f"{self.prefix}tenant:{tenant_id}"

    def health(self) -> str:
        return f"{self.prefix}model_health"

    def session(self, tenant_id: str, session_id: str) -> str:
        return f"{self.prefix}session:{tenant_id}:{session_id}"


@dataclass
class Enrichment:
    """What a batch learned from Redis; defaults when Redis was unavailable."""

    tenants: dict[str, TenantSpec] = field(default_factory=dict)
    unhealthy: frozenset[str] = frozenset()
    sessions: dict[tuple[str, str], str] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)

    def session_model(self, request: RoutingRequested) -> str | None:
        """The model this request's session is pinned to, if any."""
        if request.session_id is None:
            return None
        return self.sessions.get((request.tenant_id, request.session_id))


def _parse_tenant(raw: bytes | None, fallback: TenantSpec, tenant_id: str) -> TenantSpec:
    if raw is None:
        return fallback
    try:
        return TenantSpec.model_validate(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValidationError):
        log.warning("tenant_profile_invalid", tenant_id=tenant_id)
        return fallback


class Enricher:
    """Reads tenant profiles, model health and session affinity for a batch."""

    def __init__(
        self, url: str, prefix: str, config: RoutingConfig, timeout_s: float = 0.25
    ) -> None:
        self.keys = Keys(prefix)
        self.config = config
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=0,
            retry_on_timeout=False,
        )
        self._skip_until = 0.0

    async def __aenter__(self) -> Enricher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    @property
    def client(self) -> aioredis.Redis:
        """The underlying client, for writers that share the pool."""
        return self._client

    def _defaults(self, requests: Sequence[RoutingRequested], degraded: list[str]) -> Enrichment:
        tenants = {r.tenant_id: self.config.tenant(r.tenant_id) for r in requests}
        return Enrichment(tenants=tenants, degraded=degraded)

    async def enrich(self, requests: Sequence[RoutingRequested]) -> Enrichment:
        """One pipeline: tenant profiles, the health hash, session pins."""
        if not requests:
            return Enrichment()
        if time.monotonic() < self._skip_until:
            return self._defaults(requests, ["redis"])
        tenant_ids = sorted({r.tenant_id for r in requests})
        sessions = sorted({(r.tenant_id, r.session_id) for r in requests if r.session_id})
        pipe = self._client.pipeline(transaction=False)
        for tenant_id in tenant_ids:
            pipe.get(self.keys.tenant(tenant_id))
        pipe.hgetall(self.keys.health())
        for tenant_id, session_id in sessions:
            pipe.get(self.keys.session(tenant_id, session_id))
        try:
            replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._skip_until = time.monotonic() + _RETRY_AFTER_S
            log.warning("redis_unavailable", error=type(exc).__name__, detail=str(exc)[:200])
            return self._defaults(requests, ["redis"])
        n = len(tenant_ids)
        tenants = {
            t: _parse_tenant(raw, self.config.tenant(t), t)
            for t, raw in zip(tenant_ids, replies[:n], strict=True)
        }
        health: dict[bytes, bytes] = replies[n]
        unhealthy = frozenset(m.decode() for m, v in health.items() if v.decode() == HEALTH_DOWN)
        pins = {s: raw.decode() for s, raw in zip(sessions, replies[n + 1 :], strict=True) if raw}
        return Enrichment(tenants=tenants, unhealthy=unhealthy, sessions=pins)

    async def pin_sessions(self, pins: dict[tuple[str, str], str], ttl_s: int) -> bool:
        """Remember each session's model for `ttl_s`; False when Redis is unavailable."""
        if not pins or time.monotonic() < self._skip_until:
            return not pins
        pipe = self._client.pipeline(transaction=False)
        for (tenant_id, session_id), model in pins.items():
            pipe.set(self.keys.session(tenant_id, session_id), model, ex=ttl_s)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            self._skip_until = time.monotonic() + _RETRY_AFTER_S
            log.warning("redis_unavailable", error=type(exc).__name__)
            return False
        return True
