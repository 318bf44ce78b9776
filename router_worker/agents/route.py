"""The route agent's batch logic: validate, enrich, classify, decide, emit."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import orjson
import structlog

from router_worker import topics
from router_worker.classify.cascade import Cascade, CascadeResult
from router_worker.classify.engine import Prediction
from router_worker.config import RoutingConfig
from router_worker.enrich import Enricher, Enrichment
from router_worker.errors import ErrorCode, RequestRejected
from router_worker.events import RoutingRequested, round_half_up, utcnow
from router_worker.frozen import frozen
from router_worker.metrics import Metrics
from router_worker.policy import Choice, candidate_order, decide
from router_worker.settings import Settings
from router_worker.state.batch import BatchPlan
from router_worker.validate import Inbound, Rejected, decode, identify

log = structlog.get_logger(__name__)

PROPAGATED_HEADERS = frozenset({"correlation_id", "traceparent", "tracestate"})


@frozen
class Outgoing:
    """One record to produce."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    request_id: str
    status: str
    tenant_id: str
    # decisions_total labels (tier, model, category, policy) or failed_total's (error_code,)
    labels: tuple[str, ...]
    cost_usd: float = 0.0  # estimated spend of a decision, summed per batch into spend_usd_total
    fallback: tuple[str, str] | None = None  # (preferred model, chosen model) when it was skipped


def propagate_headers(inbound: Inbound, request_id: str) -> list[tuple[str, bytes]]:
    """Keep tracing headers; every event gets a correlation_id (the request_id by default)."""
    if not inbound.headers:  # most requests: nothing to keep
        return [("correlation_id", request_id.encode())]
    kept = [(k, v) for k, v in inbound.headers if k in PROPAGATED_HEADERS]
    if not any(k == "correlation_id" for k, _ in kept):
        kept.append(("correlation_id", request_id.encode()))
    return kept


def _correlation_id(headers: list[tuple[str, bytes]]) -> str | None:
    for key, value in headers:
        if key == "correlation_id":
            return value.decode("utf-8", errors="replace")
    return None


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)


# Confidences rounded for the event, memoised: the keyword tier's take a few dozen values.
_ROUNDED_MAX = 4096


@frozen
class _Shared:
    """What every decision of one batch shares."""

    now: datetime
    now_ms: float  # `now` in epoch milliseconds
    decided_at: str  # `now` as orjson writes a datetime: the same bytes, formatted once
    degraded: list[str]
    enrich_ms: float
    classify_ms: float
    busy_ms: float  # routing start -> predictions in hand (enrich and classify may overlap)
    version: str  # the classifier version stamped on the decisions
    enrichment: Enrichment
    plan: BatchPlan


@frozen
class _Stages:
    """A batch's enrichment and predictions, and how long each took."""

    enrichment: Enrichment
    predictions: list[Prediction | None]  # None where over its rate (or nothing predicted)
    limited: list[RequestRejected | None]
    degraded: list[str]  # the cascade's
    enrich_ms: float  # routing start -> enrichment in hand
    classify_ms: float
    classified: float  # time.monotonic() once every prediction was in hand


class _Early:
    """A small batch's classification, run by the enricher right after the batch's Redis
    pipeline is on the wire: the classifier and Redis then work at the same time."""

    def __init__(self, cascade: Cascade, texts: list[str]) -> None:
        self.cascade = cascade
        self.texts = texts
        self.result: CascadeResult | None = None
        self.error: Exception | None = None
        self.ms = 0.0

    def __call__(self) -> None:
        start = time.monotonic()
        try:
            self.result = self.cascade.classify_now(self.texts)
        except Exception as exc:  # re-raised in the batch's own code, not inside redis-py
            self.error = exc
        self.ms = _ms(start, time.monotonic())


class Router:
    """Turns a micro-batch of raw records into completed/failed records."""

    def __init__(
        self,
        settings: Settings,
        config: RoutingConfig,
        cascade: Cascade,
        enricher: Enricher | None,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.config = config
        self.cascade = cascade
        self.enricher = enricher
        self.metrics = metrics
        self.completed_topic = settings.topic(topics.COMPLETED)
        self.failed_topic = settings.topic(topics.FAILED)
        self._unhealthy_seen: frozenset[str] | None = None
        self._rounded: dict[float, float] = {}
        # Checked once: even a filtered structlog call costs a logger bind per request.
        self._log_decisions = settings.log_level == "debug"

    async def route(self, batch: Sequence[Inbound]) -> list[Outgoing]:
        """Route a batch; every input yields exactly one output record."""
        started = time.monotonic()
        now = utcnow()
        self.metrics.batch_size.labels("route").observe(len(batch))
        decoded = [decode(i, self.settings.max_prompt_bytes) for i in batch]
        valid = [(i, d) for i, d in enumerate(decoded) if isinstance(d, RoutingRequested)]
        requests = [d for _, d in valid]

        texts = [r.text() for r in requests]
        plan = BatchPlan(self.config, requests, texts, self.cascade.version,
                         self.config.cache.active(self.cascade.engine is not None))
        stages = await self._prepare(requests, texts, plan, started)
        classified = stages.classified

        out: list[Outgoing | None] = [None] * len(batch)
        for index, item in enumerate(decoded):
            if isinstance(item, Rejected):
                out[index] = self._failed(batch[index], item, now)
        # No await from here to the last decision: what the batch's decisions share holds.
        enrichment = stages.enrichment
        shared = _Shared(now, now.timestamp() * 1000, orjson.dumps(now)[1:-1].decode(),
                         enrichment.degraded + stages.degraded, stages.enrich_ms,
                         stages.classify_ms, _ms(started, classified), self.cascade.version,
                         enrichment, plan)
        for (index, request), text, prediction, over in zip(
            valid, texts, stages.predictions, stages.limited, strict=True
        ):
            if over is not None or prediction is None:
                rejected = Rejected(request.request_id, request.tenant_id,
                                    over.error_code if over else ErrorCode.INTERNAL,
                                    over.detail if over else "no prediction", None,
                                    request.created_at)
                out[index] = self._failed(batch[index], rejected, now)
                continue
            out[index] = self._decide(batch[index], request, len(text), prediction, shared)
        decided = time.monotonic()
        self._observe_queue(batch, now)
        if valid:  # a batch of only bad records never asked Redis: health is unknown
            self._observe_health(enrichment)
        plan.observe(self.metrics)
        if plan.writes and self.enricher is not None:
            self.enricher.write_back_soon(plan.writes)  # in the background, in order
        self._observe(shared, _ms(classified, decided), _ms(started, decided))
        produced = [o for o in out if o is not None]
        self._count(produced)
        return produced

    async def _prepare(
        self, requests: list[RoutingRequested], texts: list[str], plan: BatchPlan, started: float
    ) -> _Stages:
        """Enrich the batch, then predict every request that is within its rate: from Redis'
        cache where it had one, else from the classifier.

        A small batch is classified while its Redis round trip is in flight. Its latency is
        then the longer of the two, not their sum. The classifier sees the whole batch, though,
        before the cache hits and over-rate requests are known. A larger batch waits for
        Redis and classifies only the rest. The bound is `classify_overlap_max`.
        """
        early = _Early(self.cascade, texts) if self._overlaps(len(requests)) else None
        enrichment = await self._enrich(requests, plan.keys, early)
        enriched = time.monotonic()
        if early is not None and early.error is not None:
            raise early.error
        plan.use(enrichment)
        # Over-rate requests fail; cache hits skip the classifier; the rest is one batch.
        limited = [plan.over_rate(r) for r in requests]
        known = [None if limited[i] else plan.cached(i) for i in range(len(requests))]
        misses = [i for i in range(len(requests)) if limited[i] is None and known[i] is None]
        if early is not None and early.result is not None:  # classified during the trip
            cascade = early.result
            fresh = [cascade.predictions[i] for i in misses]
        else:
            cascade = await self.cascade.classify([texts[i] for i in misses])
            fresh = cascade.predictions
        predictions: list[Prediction | None] = list(known)
        for i, prediction in zip(misses, fresh, strict=True):
            predictions[i] = prediction
            if not cascade.degraded:  # never cache what a degraded cascade guessed
                plan.remember(i, prediction)
        classified = time.monotonic()
        classify_ms = (early.ms if early is not None and early.result is not None
                       else _ms(enriched, classified))
        return _Stages(enrichment, predictions, limited, cascade.degraded,
                       _ms(started, enriched), classify_ms, classified)

    def _overlaps(self, size: int) -> bool:
        """Whether a batch of `size` requests is classified during its Redis round trip."""
        return (self.enricher is not None and 0 < size <= self.settings.classify_overlap_max
                and self.cascade.inline(size))

    async def _enrich(
        self, requests: list[RoutingRequested], keys: list[str],
        on_sent: Callable[[], None] | None = None,
    ) -> Enrichment:
        if self.enricher is None:
            tenants = {r.tenant_id: self.config.tenant(r.tenant_id) for r in requests}
            return Enrichment(tenants=tenants, degraded=["redis"] if requests else [])
        return await self.enricher.enrich(requests, keys, on_sent=on_sent)

    def _decide(
        self,
        inbound: Inbound,
        request: RoutingRequested,
        text_chars: int,
        prediction: Prediction,
        shared: _Shared,
    ) -> Outgoing:
        if request.task_hint is not None:
            prediction = Prediction(
                category=request.task_hint.value,
                complexity=prediction.complexity,
                confidence=1.0,
                scores=prediction.scores,
                complexity_confidence=prediction.complexity_confidence,
                tier=prediction.tier,
            )
        plan = shared.plan
        tenant = (shared.enrichment.tenants.get(request.tenant_id)
                  or self.config.tenant(request.tenant_id))
        try:
            ctx, assignment = plan.context(request, prediction.category, tenant)
            choice = decide(request, prediction, ctx, self.config, text_chars, plan.decisions)
        except RequestRejected as exc:
            rejected = Rejected(
                request.request_id,
                request.tenant_id,
                exc.error_code,
                exc.detail,
                None,
                request.created_at,
            )
            return self._failed(inbound, rejected, shared.now)
        plan.chosen(request, choice, assignment)
        return self._completed(inbound, request, prediction, choice, shared,
                               store_prompt=tenant.store_prompts)

    def _completed(
        self,
        inbound: Inbound,
        request: RoutingRequested,
        prediction: Prediction,
        choice: Choice,
        shared: _Shared,
        *,
        store_prompt: bool = False,
    ) -> Outgoing:
        waited = shared.now_ms - inbound.timestamp_ms
        queue = round_half_up(waited, 1e3) if waited > 0.0 else 0.0
        # StrEnum members are their values: orjson and the metric labels take them as they are
        tier = prediction.tier
        event: dict[str, Any] = {
            "request_id": request.request_id,
            "tenant_id": request.tenant_id,
            "decision": {
                "model": choice.model,
                "provider": choice.provider,
                "fallbacks": choice.fallbacks,
                "alternatives": choice.alternatives,
                "policy": choice.policy,
                "category": prediction.category,
                "complexity": prediction.complexity,
                "confidence": self._rounded_confidence(prediction.confidence),
                "tier": tier,
                "reason": choice.reason,
                "estimated_cost_usd": choice.estimated_cost_usd,
            },
            "classifier_version": shared.version,
            "degraded": shared.degraded,
            "timings_ms": {
                "enrich": shared.enrich_ms,
                "classify": shared.classify_ms,
                "queue": queue,
                "total": round_half_up(queue + shared.busy_ms, 1e3),
            },
            "created_at": request.created_at,
            "decided_at": shared.decided_at,
        }
        if store_prompt:  # opt-in per tenant: the training set for `dataset export`
            event["prompt"] = request.text()
        headers = propagate_headers(inbound, request.request_id)
        if self._log_decisions:
            log.debug(
                "request_decided",
                request_id=request.request_id,
                correlation_id=_correlation_id(headers),
                tenant_id=request.tenant_id,
                model=choice.model,
                tier=tier,
                policy=choice.policy,
            )
        return Outgoing(
            self.completed_topic,
            request.request_id.encode(),
            orjson.dumps(event),
            headers,
            request.request_id,
            "completed",
            request.tenant_id,
            (tier, choice.model, prediction.category, choice.policy),
            choice.estimated_cost_usd,
            self._fallback(choice),
        )

    def _rounded_confidence(self, confidence: float) -> float:
        rounded = self._rounded.get(confidence)
        if rounded is None:
            if len(self._rounded) >= _ROUNDED_MAX:
                self._rounded.clear()
            rounded = self._rounded[confidence] = round(confidence, 4)
        return rounded

    def _fallback(self, choice: Choice) -> tuple[str, str] | None:
        """(preferred, chosen) when the policy's first model was filtered out."""
        if not choice.skipped:
            return None
        preferred = choice.preferred or candidate_order(choice.policy, self.config)[0]
        if preferred == choice.model or preferred not in {m for m, _ in choice.skipped}:
            return None
        return (preferred, choice.model)

    def _failed(self, inbound: Inbound, rejected: Rejected, now: datetime) -> Outgoing:
        event = {
            "request_id": rejected.request_id,
            "tenant_id": rejected.tenant_id,
            "error_code": rejected.error_code.value,
            "error_detail": rejected.error_detail,
            "raw": rejected.raw,
            "created_at": rejected.created_at,
            "failed_at": now,
        }
        headers = propagate_headers(inbound, rejected.request_id)
        log.info(
            "request_failed",
            request_id=rejected.request_id,
            correlation_id=_correlation_id(headers),
            tenant_id=rejected.tenant_id,
            error_code=rejected.error_code.value,
        )
        return Outgoing(
            self.failed_topic,
            rejected.request_id.encode(),
            orjson.dumps(event),
            headers,
            rejected.request_id,
            "failed",
            rejected.tenant_id or "unknown",
            (rejected.error_code.value,),
        )

    def fail_all(self, batch: Sequence[Inbound], exc: Exception) -> list[Outgoing]:
        """Terminal `internal` failures for a batch that crashed the router (a bug)."""
        now = utcnow()
        detail = f"internal error: {type(exc).__name__}"
        return [
            self._failed(i, Rejected(identify(i), None, ErrorCode.INTERNAL, detail, None), now)
            for i in batch
        ]

    def _observe_queue(self, batch: Sequence[Inbound], now: datetime) -> None:
        # One observation per batch: the oldest record's wait, so p99 shows the worst case
        # without a per-request histogram call on the hot path.
        stamps = [i.timestamp_ms for i in batch if i.timestamp_ms > 0]
        if stamps:
            queue_ms = max(0.0, now.timestamp() * 1000 - min(stamps))
            self.metrics.stage_latency.labels("queue").observe(queue_ms)

    def _observe_health(self, enrichment: Enrichment) -> None:
        # Health is only known when Redis answered; set the gauges only when it changes.
        if "redis" in enrichment.degraded or enrichment.unhealthy == self._unhealthy_seen:
            return
        self._unhealthy_seen = enrichment.unhealthy
        for model in self.config.models:
            self.metrics.model_health.labels(model).set(0 if model in enrichment.unhealthy else 1)

    def _observe(self, shared: _Shared, decide_ms: float, total_ms: float) -> None:
        latency = self.metrics.stage_latency
        latency.labels("enrich").observe(shared.enrich_ms)
        latency.labels("classify").observe(shared.classify_ms)
        latency.labels("decide").observe(decide_ms)
        latency.labels("total").observe(total_ms)

    def _count(self, outgoing: Sequence[Outgoing]) -> None:
        # One inc per label combination, not per request: cheap at high rates.
        requests: Counter[tuple[str, str]] = Counter((o.tenant_id, o.status) for o in outgoing)
        labels: Counter[tuple[str, tuple[str, ...]]] = Counter(
            (o.status, o.labels) for o in outgoing
        )
        for (tenant, status), n in requests.items():
            self.metrics.requests.labels(tenant, status).inc(n)
        for (status, values), n in labels.items():
            counter = self.metrics.decisions if status == "completed" else self.metrics.failed
            counter.labels(*values).inc(n)
        spend: defaultdict[tuple[str, str], float] = defaultdict(float)
        fallbacks: Counter[tuple[str, str]] = Counter()
        for o in outgoing:
            if o.status == "completed":
                spend[(o.tenant_id, o.labels[1])] += o.cost_usd
                if o.fallback is not None:
                    fallbacks[o.fallback] += 1
        for (tenant, model), usd in spend.items():
            self.metrics.spend.labels(tenant, model).inc(usd)
        for (preferred, chosen), n in fallbacks.items():
            self.metrics.fallback.labels(preferred, chosen).inc(n)
