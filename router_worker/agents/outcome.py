"""The outcome agent: outcomes -> breakers, performance EWMAs, spend, experiment counters,
budget alerts. Two pipelined Redis round trips per batch (update, then react)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog
from pydantic import ValidationError
from redis.exceptions import RedisError

from router_worker import topics
from router_worker.agents.route import Outgoing
from router_worker.agents.runtime import inbound_from_event
from router_worker.config import RoutingConfig, TenantSpec, load_config
from router_worker.enrich import Keys
from router_worker.errors import DependencyUnavailable
from router_worker.events import RoutingOutcome
from router_worker.metrics import Metrics
from router_worker.settings import Settings
from router_worker.state.budget import WINDOW_TTL_S, BudgetLevel, budget_status, window_ids
from router_worker.state.health import FORCED_DOWN, Transition, open_value, transition
from router_worker.state.perf import PERF_SCRIPT, PerfStats, demotion, series_name
from router_worker.validate import Inbound

log = structlog.get_logger(__name__)


@dataclass
class _ModelBatch:
    failures: list[str] = field(default_factory=list)
    successes: int = 0


def parse_outcomes(batch: Sequence[Inbound]) -> list[RoutingOutcome]:
    """The well-formed outcomes of a batch; a malformed one is logged and skipped (it has no
    request to fail, and it must not stop the agent)."""
    parsed = []
    for inbound in batch:
        try:
            parsed.append(RoutingOutcome.model_validate_json(inbound.value or b""))
        except ValidationError as exc:
            log.warning("outcome_malformed", topic=inbound.topic, partition=inbound.partition,
                        offset=inbound.offset, error=str(exc)[:200])
    return parsed


def _series(outcomes: Sequence[RoutingOutcome]) -> dict[str, list[RoutingOutcome]]:
    grouped: dict[str, list[RoutingOutcome]] = defaultdict(list)
    for outcome in outcomes:
        grouped[series_name(outcome.model)].append(outcome)
        category = outcome.label or outcome.category
        if category is not None:
            grouped[series_name(outcome.model, category.value)].append(outcome)
    return grouped


class OutcomeRecorder:
    """Applies outcome batches to the shared Redis state."""

    def __init__(self, settings: Settings, config: RoutingConfig, metrics: Metrics,
                 client: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self.keys = Keys(settings.redis_prefix)
        self.alerts_topic = settings.topic(topics.ALERTS)
        self._client = client or aioredis.Redis.from_url(
            settings.redis_url.get_secret_value(), socket_timeout=2.0,
            socket_connect_timeout=2.0)

    async def stop(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def record(self, batch: Sequence[Inbound], now: float | None = None) -> list[Outgoing]:
        """Apply a batch; returns the alert records to publish. Raises DependencyUnavailable
        when Redis fails (the caller retries: nothing is acknowledged before this returns)."""
        outcomes = parse_outcomes(batch)
        if not outcomes:
            return []
        try:
            return await self._apply(outcomes, time.time() if now is None else now)
        except (RedisError, OSError) as exc:
            raise DependencyUnavailable(f"Redis unavailable for outcomes: {exc}") from exc

    async def _apply(self, outcomes: list[RoutingOutcome], now: float) -> list[Outgoing]:
        cfg, keys = self.config, self.keys
        models: dict[str, _ModelBatch] = defaultdict(_ModelBatch)
        for outcome in outcomes:
            if outcome.success:
                models[outcome.model].successes += 1
            else:
                models[outcome.model].failures.append(outcome.request_id)
        series = _series(outcomes) if cfg.performance.enabled else {}
        windows = window_ids(datetime.fromtimestamp(now, UTC))
        spend: dict[tuple[str, str], float] = defaultdict(float)
        for outcome in outcomes:
            if outcome.cost_usd > 0 and cfg.budgets.enabled:
                spend[("t", outcome.tenant_id)] += outcome.cost_usd
                spend[("m", outcome.model)] += outcome.cost_usd
                if outcome.policy:
                    spend[("p", outcome.policy)] += outcome.cost_usd
        tenants = sorted({t for kind, t in spend if kind == "t"})

        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(keys.health())
        counted = [m for m, b in models.items() if b.failures] if cfg.health.enabled else []
        for model in counted:
            key = keys.failures(model)
            # request_id as member: a redelivered failure is counted once
            pipe.zadd(key, dict.fromkeys(models[model].failures, now))
            pipe.zremrangebyscore(key, "-inf", now - cfg.health.window_s)
            pipe.zcard(key)
            pipe.expire(key, int(cfg.health.window_s * 2) + 1)
        if series:
            args: list[Any] = [cfg.performance.alpha]
            for name, items in series.items():
                args += [name, len(items), sum(o.success for o in items) / len(items),
                         sum(o.latency_ms for o in items) / len(items)]
            pipe.eval(PERF_SCRIPT, 1, keys.perf(), *args)
            pipe.hgetall(keys.demoted())
        for (kind, name), usd in spend.items():
            for window, window_id in windows.items():
                key = keys.spend(kind, name, window_id)
                pipe.incrbyfloat(key, usd)
                pipe.expire(key, WINDOW_TTL_S[window])
        for tenant_id in tenants:
            pipe.get(keys.tenant(tenant_id))
        if cfg.experiments:
            for outcome in outcomes:
                pipe.get(keys.experiment_request(outcome.request_id))
        replies = iter(await pipe.execute())

        health = {k.decode(): v.decode() for k, v in next(replies).items()}
        recent = {}
        for model in counted:
            next(replies)
            next(replies)
            recent[model] = int(next(replies))
            next(replies)
        stats: dict[str, PerfStats] = {}
        demoted: dict[str, str] = {}
        if series:
            flat = next(replies)
            for i, name in enumerate(series):
                n, s, lat = flat[3 * i: 3 * i + 3]
                stats[name] = PerfStats(int(float(n)), float(s), float(lat))
            demoted = {k.decode(): v.decode() for k, v in next(replies).items()}
        daily: dict[str, float] = {}
        for (kind, name), _ in spend.items():
            for window in windows:
                total = float(next(replies))
                next(replies)
                if kind == "t" and window == "daily":
                    daily[name] = total
        profiles = {t: next(replies) for t in tenants}
        arms = [next(replies) for _ in outcomes] if cfg.experiments else []

        react = self._client.pipeline(transaction=False)
        self._breakers(react, models, recent, health, now)
        self._demotions(react, stats, demoted)
        self._experiments(react, outcomes, arms)
        alerts = self._budget_alerts(react, daily, profiles, windows["daily"], now)
        results = await react.execute()
        # the SET NX replies are the last ones: True only for the first worker in the window
        fired = [a for a, ok in zip(alerts, results[len(results) - len(alerts):], strict=True)
                 if ok]
        for outcome in outcomes:
            self.metrics.outcomes.labels(outcome.model,
                                         "success" if outcome.success else "failure").inc()
        return [self._alert_record(a) for a in fired]

    def _breakers(self, pipe: Any, models: dict[str, _ModelBatch], recent: dict[str, int],
                  health: dict[str, str], now: float) -> None:
        if not self.config.health.enabled:
            return
        for model, batch in models.items():
            value = health.get(model)
            if value == FORCED_DOWN:
                continue
            move = transition(value, recent.get(model, 0), batch.successes, len(batch.failures),
                              now, self.config.health)
            if move is Transition.OPEN:
                pipe.hset(self.keys.health(), model, open_value(now, self.config.health))
                self.metrics.model_health.labels(model).set(0)
                log.warning("model_circuit_opened", model=model, failures=recent.get(model, 0))
            elif move is Transition.CLOSE:
                pipe.hdel(self.keys.health(), model)
                pipe.delete(self.keys.failures(model))
                self.metrics.model_health.labels(model).set(1)
                log.info("model_circuit_closed", model=model)

    def _demotions(self, pipe: Any, stats: dict[str, PerfStats], demoted: dict[str, str]) -> None:
        for name, series_stats in stats.items():
            was = name in demoted
            why = demotion(series_stats, was, self.config.performance)
            if why is not None and why != demoted.get(name):
                pipe.hset(self.keys.demoted(), name, why)
                if not was:
                    log.warning("model_demoted", series=name, reason=why)
            elif why is None and was:
                pipe.hdel(self.keys.demoted(), name)
                log.info("model_promoted", series=name)

    def _experiments(self, pipe: Any, outcomes: list[RoutingOutcome],
                     arms: list[bytes | None]) -> None:
        for outcome, raw in zip(outcomes, arms, strict=False):
            if not raw:
                continue
            experiment, _, arm = raw.decode().partition("|")
            key = self.keys.experiment(experiment)
            pipe.hincrby(key, f"{arm}|outcomes", 1)
            pipe.hincrby(key, f"{arm}|successes", int(outcome.success))
            pipe.hincrbyfloat(key, f"{arm}|latency_ms", outcome.latency_ms)
            pipe.hincrbyfloat(key, f"{arm}|cost_usd", outcome.cost_usd)

    def _budget_alerts(self, pipe: Any, daily: dict[str, float], profiles: dict[str, Any],
                       window_id: str, now: float) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = []
        for tenant_id, total in daily.items():
            spec = self.config.tenant(tenant_id)
            raw = profiles.get(tenant_id)
            if raw:
                with contextlib.suppress(orjson.JSONDecodeError, ValidationError):
                    spec = TenantSpec.model_validate(orjson.loads(raw))
            status = budget_status(total, spec.daily_budget_usd, self.config.budgets.alert_ratio)
            if status is None:
                continue
            self.metrics.budget_used_ratio.labels(tenant_id).set(status.ratio)
            if status.level is BudgetLevel.OK:
                continue
            kind = status.level.value
            alerts.append({
                "alert_id": f"{kind}:{tenant_id}:{window_id}", "kind": kind,
                "tenant_id": tenant_id, "window": "daily", "window_id": window_id,
                "spend_usd": round(status.spend_usd, 8), "budget_usd": status.budget_usd,
                "ratio": round(status.ratio, 4),
                "raised_at": datetime.fromtimestamp(now, UTC),
            })
        for alert in alerts:
            pipe.set(self.keys.alert(alert["kind"], alert["tenant_id"], window_id), "1",
                     nx=True, ex=WINDOW_TTL_S["daily"])
        return alerts

    def _alert_record(self, alert: dict[str, Any]) -> Outgoing:
        log.warning("budget_alert", kind=alert["kind"], tenant_id=alert["tenant_id"],
                    ratio=alert["ratio"])
        return Outgoing(self.alerts_topic, alert["alert_id"].encode(), orjson.dumps(alert),
                        [("correlation_id", alert["alert_id"].encode())], alert["alert_id"],
                        "alert", alert["tenant_id"], (alert["kind"],))


_BACKOFF_START_S = 0.2
_BACKOFF_MAX_S = 5.0


async def apply_until_done(recorder: OutcomeRecorder, batch: list[Inbound]) -> list[Outgoing]:
    """Retry while Redis is down (nothing is acknowledged meanwhile); a bug skips the batch
    loudly rather than stopping the agent (the sink still stores every outcome)."""
    delay = _BACKOFF_START_S
    while True:
        try:
            return await recorder.record(batch)
        except DependencyUnavailable as exc:
            log.warning("outcome_apply_failed", retry_in_s=delay, error=str(exc)[:200])
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)
        except Exception:  # a bug must not kill the agent
            log.exception("outcome_batch_crashed", records=len(batch))
            return []


async def consume_outcomes(
    stream: Any, settings: Settings, metrics: Metrics,
    publish: Callable[[list[Outgoing]], Awaitable[None]],
) -> None:
    """The outcome agent's body: batches in, Redis updated and alerts published, then acked."""
    recorder = OutcomeRecorder(settings, load_config(settings.config), metrics)
    try:
        async for events in stream.noack_take(settings.max_batch,
                                              within=settings.max_wait_ms / 1000):
            metrics.batch_size.labels("outcome").observe(len(events))
            alerts = await apply_until_done(recorder, [inbound_from_event(e) for e in events])
            if alerts:
                await publish(alerts)
            for event in events:
                await stream.ack(event)
    finally:
        await recorder.stop()
