"""The route agent's batch logic: validate, enrich, classify, decide, emit."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import structlog

from router_worker import topics
from router_worker.classify.cascade import Cascade
from router_worker.classify.engine import Prediction
from router_worker.config import RoutingConfig
from router_worker.enrich import Enricher, Enrichment
from router_worker.errors import ErrorCode, RequestRejected
from router_worker.events import RoutingRequested, utcnow
from router_worker.metrics import Metrics
from router_worker.policy import Choice, Context, decide
from router_worker.settings import Settings
from router_worker.validate import Inbound, Rejected, decode, identify

log = structlog.get_logger(__name__)

PROPAGATED_HEADERS = frozenset({"correlation_id", "traceparent", "tracestate"})
SESSION_TTL_S = 3600


@dataclass(frozen=True, slots=True)
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


def propagate_headers(inbound: Inbound, request_id: str) -> list[tuple[str, bytes]]:
    """Keep tracing headers; every event gets a correlation_id (the request_id by default)."""
    kept = [(k, v) for k, v in inbound.headers if k in PROPAGATED_HEADERS]
    if not any(k == "correlation_id" for k, _ in kept):
        kept.append(("correlation_id", request_id.encode()))
    return kept


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)


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

    async def route(self, batch: Sequence[Inbound]) -> list[Outgoing]:
        """Route a batch; every input yields exactly one output record."""
        started = time.monotonic()
        now = utcnow()
        self.metrics.batch_size.labels("route").observe(len(batch))
        decoded = [decode(i, self.settings.max_prompt_bytes) for i in batch]
        valid = [(i, d) for i, d in enumerate(decoded) if isinstance(d, RoutingRequested)]
        requests = [d for _, d in valid]

        enrichment = await self._enrich(requests)
        enriched = time.monotonic()
        texts = [r.text() for r in requests]
        cascade = await self.cascade.classify(texts)
        classified = time.monotonic()

        out: list[Outgoing | None] = [None] * len(batch)
        for index, item in enumerate(decoded):
            if isinstance(item, Rejected):
                out[index] = self._failed(batch[index], item, now)
        pins: dict[tuple[str, str], str] = {}
        stage_ms = {"enrich": _ms(started, enriched), "classify": _ms(enriched, classified)}
        degraded = enrichment.degraded + cascade.degraded
        for (index, request), text, prediction in zip(
            valid, texts, cascade.predictions, strict=True
        ):
            out[index] = self._decide(
                batch[index],
                request,
                len(text),
                prediction,
                enrichment,
                degraded,
                stage_ms,
                now,
                pins,
            )
        decided = time.monotonic()
        if pins and self.enricher is not None:
            await self.enricher.pin_sessions(pins, SESSION_TTL_S)
        self._observe(stage_ms, _ms(classified, decided), _ms(started, decided))
        produced = [o for o in out if o is not None]
        self._count(produced)
        return produced

    async def _enrich(self, requests: list[RoutingRequested]) -> Enrichment:
        if self.enricher is None:
            tenants = {r.tenant_id: self.config.tenant(r.tenant_id) for r in requests}
            return Enrichment(tenants=tenants, degraded=["redis"] if requests else [])
        return await self.enricher.enrich(requests)

    def _decide(
        self,
        inbound: Inbound,
        request: RoutingRequested,
        text_chars: int,
        prediction: Prediction,
        enrichment: Enrichment,
        degraded: list[str],
        stage_ms: dict[str, float],
        now: datetime,
        pins: dict[tuple[str, str], str],
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
        tenant = enrichment.tenants.get(request.tenant_id) or self.config.tenant(request.tenant_id)
        ctx = Context(
            tenant=tenant,
            unhealthy=enrichment.unhealthy,
            session_model=enrichment.session_model(request),
        )
        try:
            choice = decide(request, prediction, ctx, self.config, text_chars)
        except RequestRejected as exc:
            rejected = Rejected(
                request.request_id,
                request.tenant_id,
                exc.error_code,
                exc.detail,
                None,
                request.created_at,
            )
            return self._failed(inbound, rejected, now)
        if request.session_id is not None:
            pins[(request.tenant_id, request.session_id)] = choice.model
        queue_ms = max(0.0, now.timestamp() * 1000 - inbound.timestamp_ms)
        return self._completed(
            inbound,
            request,
            prediction,
            choice,
            degraded,
            {**stage_ms, "queue": round(queue_ms, 3)},
            now,
        )

    def _completed(
        self,
        inbound: Inbound,
        request: RoutingRequested,
        prediction: Prediction,
        choice: Choice,
        degraded: list[str],
        stage_ms: dict[str, float],
        now: datetime,
    ) -> Outgoing:
        total = stage_ms["queue"] + stage_ms["enrich"] + stage_ms["classify"]
        event: dict[str, Any] = {
            "request_id": request.request_id,
            "tenant_id": request.tenant_id,
            "decision": {
                "model": choice.model,
                "provider": choice.provider,
                "fallbacks": choice.fallbacks,
                "alternatives": [{"model": m, "score": s} for m, s in choice.alternatives],
                "policy": choice.policy,
                "category": prediction.category,
                "complexity": prediction.complexity,
                "confidence": round(prediction.confidence, 4),
                "tier": prediction.tier.value,
                "reason": choice.reason,
                "estimated_cost_usd": choice.estimated_cost_usd,
            },
            "classifier_version": self.cascade.version,
            "degraded": degraded,
            "timings_ms": {**stage_ms, "total": round(total, 3)},
            "created_at": request.created_at,
            "decided_at": now,
        }
        return Outgoing(
            self.completed_topic,
            request.request_id.encode(),
            orjson.dumps(event),
            propagate_headers(inbound, request.request_id),
            request.request_id,
            "completed",
            request.tenant_id,
            (prediction.tier.value, choice.model, prediction.category, choice.policy),
        )

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
        log.info(
            "request_failed",
            request_id=rejected.request_id,
            tenant_id=rejected.tenant_id,
            error_code=rejected.error_code.value,
        )
        return Outgoing(
            self.failed_topic,
            rejected.request_id.encode(),
            orjson.dumps(event),
            propagate_headers(inbound, rejected.request_id),
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

    def _observe(self, stage_ms: dict[str, float], decide_ms: float, total_ms: float) -> None:
        latency = self.metrics.stage_latency
        latency.labels("enrich").observe(stage_ms["enrich"])
        latency.labels("classify").observe(stage_ms["classify"])
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
