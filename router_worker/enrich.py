"""Stage 2: enrich a micro-batch from Redis in one pipelined round trip."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog
from pydantic import ValidationError
from redis.exceptions import RedisError

from router_worker.classify.engine import Prediction
from router_worker.config import RoutingConfig, TenantSpec
from router_worker.events import RoutingRequested
from router_worker.redis_wire import ON_SENT, with_fast_packing
from router_worker.state.budget import window_ids
from router_worker.state.cache import decode_prediction
from router_worker.state.health import HEALTH_SCRIPT
from router_worker.state.ratelimit import BUCKET_SCRIPT, bucket_size

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
        # Length-prefixed: both ids are free text, and "a" + "b:c" must not meet "a:b" + "c"
        # (one tenant pinning another tenant's session).
        return f"{self.prefix}session:{len(tenant_id)}:{tenant_id}:{session_id}"

    def probe_prefix(self) -> str:
        return f"{self.prefix}probe:"

    def failures(self, model: str) -> str:
        return f"{self.prefix}failures:{model}"

    def perf(self) -> str:
        return f"{self.prefix}perf"

    def demoted(self) -> str:
        return f"{self.prefix}demoted"

    def cache(self, key: str) -> str:
        return f"{self.prefix}cache:{key}"

    def spend(self, kind: str, name: str, window_id: str) -> str:
        """Spend counter; kind is t (tenant), m (model) or p (policy)."""
        return f"{self.prefix}spend:{kind}:{name}:{window_id}"

    def bucket(self, tenant_id: str) -> str:
        return f"{self.prefix}bucket:{tenant_id}"

    def experiment(self, name: str) -> str:
        return f"{self.prefix}exp:{name}"

    def experiment_request(self, request_id: str) -> str:
        return f"{self.prefix}expreq:{request_id}"

    def alert(self, kind: str, tenant_id: str, window_id: str) -> str:
        return f"{self.prefix}alert:{kind}:{tenant_id}:{window_id}"


@dataclass
class WriteBack:
    """Everything a routed batch writes to Redis, in one pipeline after the decisions."""

    pins: dict[tuple[str, str], str] = field(default_factory=dict)
    pin_ttl_s: int = 3600
    cache: dict[str, bytes] = field(default_factory=dict)
    cache_ttl_s: int = 3600
    # (request_id, experiment, arm) of requests routed by an experiment arm
    assignments: list[tuple[str, str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.pins or self.cache or self.assignments)

    def merged(self, later: WriteBack) -> WriteBack:
        """This batch's writes followed by a later batch's (the later pin or entry wins)."""
        return WriteBack(
            pins={**self.pins, **later.pins}, pin_ttl_s=later.pin_ttl_s,
            cache={**self.cache, **later.cache}, cache_ttl_s=later.cache_ttl_s,
            assignments=[*self.assignments, *later.assignments],
        )


async def drop_keys(url: str, prefix: str) -> None:
    """Remove every key under `prefix` (a benchmark or test run's own), in batches."""
    client = aioredis.Redis.from_url(url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


# SET key value EX ttl for many keys in one command: redis-py spends ~15 us of Python per pipelined
# command, so a batch's hundreds of cache entries go as one script call instead.
SET_MANY_SCRIPT = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
end
return #KEYS
"""


def set_many(pipe: Any, items: Sequence[tuple[str, str | bytes]], ttl_s: int) -> None:
    """Queue one SET_MANY_SCRIPT call for `items` on `pipe` (nothing when empty)."""
    if items:
        pipe.eval(SET_MANY_SCRIPT, len(items), *(k for k, _ in items), ttl_s,
                  *(v for _, v in items))


# How long a routed batch's writes wait to ride on the next batch's enrich pipeline before
# they go on their own: short next to the pin and cache TTLs, long next to a batch at load.
WRITE_BACK_DELAY_S = 0.02

# How long a request's experiment arm is remembered for joining its outcome.
ASSIGNMENT_TTL_S = 7 * 86400


@dataclass
class Enrichment:
    """What a batch learned from Redis; defaults when Redis was unavailable."""

    tenants: dict[str, TenantSpec] = field(default_factory=dict)
    unhealthy: frozenset[str] = frozenset()
    sessions: dict[tuple[str, str], str] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    # half-open models this worker won the probe for: one request of the batch may use each
    probes: frozenset[str] = frozenset()
    # perf series (`model` or `model@category`) -> why it is demoted
    demoted: dict[str, str] = field(default_factory=dict)
    # cache key -> cached classification (hits only)
    cached: dict[str, Prediction] = field(default_factory=dict)
    # tenant -> spend so far today (USD), for tenants with a daily budget
    spend: dict[str, float] = field(default_factory=dict)
    # tenant -> how many of this batch's requests its token bucket lets through
    granted: dict[str, int] = field(default_factory=dict)

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


def _parse_health(reply: object, scripted: bool) -> tuple[frozenset[str], frozenset[str]]:
    """(unhealthy models, half-open models whose probe this worker claimed)."""
    if not scripted:
        assert isinstance(reply, dict)
        down = frozenset(m.decode() for m, v in reply.items() if v.decode() == HEALTH_DOWN)
        return down, frozenset()
    assert isinstance(reply, list)
    unhealthy: set[str] = set()
    probes: set[str] = set()
    for model, state in zip(reply[::2], reply[1::2], strict=True):
        (probes if state == b"probe" else unhealthy).add(model.decode())
    return frozenset(unhealthy), frozenset(probes)


def _once(callback: Callable[[], None]) -> Callable[[], None]:
    """`callback`, run on the first call only (a fresh connection sends its handshake
    first)."""
    pending = [callback]

    def run() -> None:
        if pending:
            pending.pop()()

    return run


class Enricher:
    """Reads tenant profiles, model health and session affinity for a batch."""

    def __init__(
        self, url: str, prefix: str, config: RoutingConfig, timeout_s: float = 0.25
    ) -> None:
        self.keys = Keys(prefix)
        self.config = config
        self._client = with_fast_packing(aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=0,
            retry_on_timeout=False,
        ))
        self._skip_until = 0.0
        # Writes queued by `write_back_soon` and not sent yet, and the timer that sends them
        # on their own when no enrich takes them first.
        self._pending: WriteBack | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        # The last pipeline that carried writes; the next enrich waits for it.
        self._writing: asyncio.Future[Any] | None = None

    async def __aenter__(self) -> Enricher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def warm(self, connections: int) -> None:
        """Open `connections` pooled connections and compile the Lua scripts, so the first
        batches do not pay for them. With Redis unavailable it logs and returns: the worker
        starts anyway and routes degraded."""
        try:
            await asyncio.gather(*(self._client.ping() for _ in range(max(connections, 1))))
            for script in (HEALTH_SCRIPT, BUCKET_SCRIPT, SET_MANY_SCRIPT):
                await self._client.script_load(script)
        except (RedisError, OSError) as exc:
            log.warning("redis_unavailable", error=type(exc).__name__, detail=str(exc)[:200])

    async def stop(self) -> None:
        """Finish queued write-backs, then close the connection pool."""
        await self.flush()
        await self._client.aclose()

    def write_back_soon(self, writes: WriteBack) -> None:
        """Queue a batch's write-back and return at once, so its decisions are produced
        without waiting for Redis.

        The queued writes go at the head of the next batch's enrich pipeline: one round trip
        per batch instead of two (each costs ~0.3 ms of redis-py and socket work, a fixed cost
        that dominates small batches). Redis runs a pipeline in order, so the next batch still
        sees this batch's session pins and cache entries. When no batch comes within
        `WRITE_BACK_DELAY_S`, the writes go on their own; `flush` and `stop` send them at once.
        """
        if not writes:
            return
        if self._pending is not None:
            self._pending = self._pending.merged(writes)
            return
        self._pending = writes
        self._send_timer = asyncio.get_running_loop().call_later(
            WRITE_BACK_DELAY_S, self._send_pending
        )

    def _take_pending(self) -> WriteBack | None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        writes, self._pending = self._pending, None
        return writes

    def _send_pending(self) -> None:
        """Send the queued writes on their own pipeline, after any still in flight."""
        writes = self._take_pending()
        if writes:
            previous = self._writing
            self._writing = asyncio.ensure_future(self._write_after(previous, writes))

    async def _write_after(self, previous: asyncio.Future[Any] | None, writes: WriteBack) -> bool:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        try:
            return await self.write_back(writes)
        except Exception:  # nobody awaits this result: a bug must still be seen
            log.exception("redis_write_back_failed")
            return False

    async def _wait_writing(self) -> None:
        writing = self._writing
        if writing is not None:
            await asyncio.gather(writing, return_exceptions=True)
            if self._writing is writing:
                self._writing = None

    async def flush(self) -> None:
        """Send the queued writes now and wait until every write-back has finished (or
        failed, logged)."""
        self._send_pending()
        await self._wait_writing()

    @property
    def client(self) -> aioredis.Redis:
        """The underlying client, for writers that share the pool."""
        return self._client

    def _defaults(self, requests: Sequence[RoutingRequested], degraded: list[str]) -> Enrichment:
        tenants = {r.tenant_id: self.config.tenant(r.tenant_id) for r in requests}
        return Enrichment(tenants=tenants, degraded=degraded)

    async def enrich(
        self, requests: Sequence[RoutingRequested], cache_keys: Sequence[str] = (),
        now: float | None = None, on_sent: Callable[[], None] | None = None,
    ) -> Enrichment:
        """One pipeline: the earlier batches' queued writes, then tenant profiles, breakers
        (claiming half-open probes), demotions, session pins, cached classifications, today's
        spend and the token buckets.

        `on_sent`, when given, runs once the pipeline is on the wire, before its reply is read:
        work done there overlaps the server's. It runs inside redis-py's call, so it must not
        raise. It does not run when no round trip is made (no requests; Redis skipped after a
        failure)."""
        if not requests:
            return Enrichment()
        if self._writing is not None:  # earlier batches' pins and cache entries land first
            await self._wait_writing()
        writes = self._take_pending()  # ... or at the head of this pipeline
        if time.monotonic() < self._skip_until:
            return self._defaults(requests, ["redis"])
        now = time.time() if now is None else now
        config = self.config
        tenant_ids = sorted({r.tenant_id for r in requests})
        sessions = sorted({(r.tenant_id, r.session_id) for r in requests if r.session_id}) if (
            config.affinity.enabled) else []
        keys = sorted(set(cache_keys))  # none when the batch does not use the cache
        budgeted = [t for t in tenant_ids if config.budgets.enabled]
        limits = {t: bucket_size(config.tenant(t)) for t in tenant_ids} if (
            config.rate_limits.enabled) else {}
        limited = [(t, lim) for t, lim in limits.items() if lim is not None]
        wanted: dict[str, int] = {}
        for request in requests:
            wanted[request.tenant_id] = wanted.get(request.tenant_id, 0) + 1
        day = window_ids(datetime.fromtimestamp(now, UTC))["daily"]

        pipe = self._client.pipeline(transaction=False)
        if writes:
            self._queue_writes(pipe, writes)
        written = len(pipe)
        for tenant_id in tenant_ids:
            pipe.get(self.keys.tenant(tenant_id))
        if config.health.enabled:
            pipe.eval(HEALTH_SCRIPT, 1, self.keys.health(), repr(now), self.keys.probe_prefix(),
                      int(config.health.cooldown_s * 1000))
        else:
            pipe.hgetall(self.keys.health())
        pipe.hgetall(self.keys.demoted())
        for tenant_id, session_id in sessions:
            pipe.get(self.keys.session(tenant_id, session_id))
        if keys:
            pipe.mget([self.keys.cache(k) for k in keys])
        if budgeted:
            pipe.mget([self.keys.spend("t", t, day) for t in budgeted])
        for tenant_id, (rate, burst) in limited:
            pipe.eval(BUCKET_SCRIPT, 1, self.keys.bucket(tenant_id), rate, burst,
                      int(now * 1000), wanted[tenant_id])
        # The task takes ON_SENT from this context as it is now: only this pipeline's sends
        # see it (the first one runs `on_sent`).
        hook = ON_SENT.set(_once(on_sent)) if on_sent is not None else None
        execution = asyncio.ensure_future(pipe.execute())
        if hook is not None:
            ON_SENT.reset(hook)
        if writes:  # a batch routed alongside this one reads only after these writes land
            self._writing = execution
        try:
            replies = iter((await execution)[written:])
        except (RedisError, OSError) as exc:
            log.warning("redis_unavailable", error=type(exc).__name__, detail=str(exc)[:200])
            await self._unavailable()
            return self._defaults(requests, ["redis"])
        tenants = {t: _parse_tenant(next(replies), config.tenant(t), t) for t in tenant_ids}
        unhealthy, probes = _parse_health(next(replies), config.health.enabled)
        demoted = {k.decode(): v.decode() for k, v in next(replies).items()}
        pins = {s: raw.decode() for s in sessions if (raw := next(replies))}
        cached: dict[str, Prediction] = {}
        if keys:
            for key, raw in zip(keys, next(replies), strict=True):
                prediction = decode_prediction(raw)
                if prediction is not None:
                    cached[key] = prediction
        spend: dict[str, float] = {}
        if budgeted:
            spend = {t: float(raw or 0) for t, raw in zip(budgeted, next(replies), strict=True)}
        granted = {t: int(next(replies)) for t, _ in limited}
        return Enrichment(tenants=tenants, unhealthy=unhealthy, sessions=pins, probes=probes,
                          demoted=demoted, cached=cached, spend=spend, granted=granted)

    async def write_back(self, writes: WriteBack) -> bool:
        """Session pins, cache entries and experiment assignments in one pipeline; False when
        Redis is unavailable (nothing here is needed for the decisions already made)."""
        if not writes or time.monotonic() < self._skip_until:
            return not writes
        pipe = self._client.pipeline(transaction=False)
        self._queue_writes(pipe, writes)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("redis_unavailable", error=type(exc).__name__)
            await self._unavailable()
            return False
        return True

    async def _unavailable(self) -> None:
        """After a failed round trip: skip Redis for `_RETRY_AFTER_S`, and close the idle
        pooled connections.

        Why close them: a connection that sat idle through an outage still looks open, but the
        server that knew it is gone. The first batch to draw it after Redis is back failed
        ("Connection closed by server") and skipped Redis for another second: ~140 degraded
        decisions after recovery at 300 req/s. Closed, it reconnects on its next use.
        """
        self._skip_until = time.monotonic() + _RETRY_AFTER_S
        with contextlib.suppress(Exception):  # closing a socket to a dead server may fail too
            await self._client.connection_pool.disconnect(inuse_connections=False)

    def _queue_writes(self, pipe: Any, writes: WriteBack) -> None:
        keys = self.keys
        set_many(pipe, [(keys.session(t, s), m) for (t, s), m in writes.pins.items()],
                 writes.pin_ttl_s)
        set_many(pipe, [(keys.cache(k), v) for k, v in writes.cache.items()], writes.cache_ttl_s)
        arms = Counter((experiment, arm) for _, experiment, arm in writes.assignments)
        for (experiment, arm), n in arms.items():
            pipe.hincrby(keys.experiment(experiment), f"{arm}|assigned", n)
        set_many(pipe, [(keys.experiment_request(r), f"{e}|{a}") for r, e, a in writes.assignments],
                 ASSIGNMENT_TTL_S)

    async def pin_sessions(self, pins: dict[tuple[str, str], str], ttl_s: int) -> bool:
        """Remember each session's model for `ttl_s`; False when Redis is unavailable."""
        return await self.write_back(WriteBack(pins=pins, pin_ttl_s=ttl_s))
