"""All Prometheus metrics in one typed bundle, created on an injectable registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Millisecond buckets: routing stages live between tens of microseconds and a few seconds.
MS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class Metrics:
    """The worker's metrics; one instance per registry."""

    registry: CollectorRegistry
    requests: Counter
    decisions: Counter
    failed: Counter
    fallback: Counter
    stage_latency: Histogram
    batch_size: Histogram
    cache_lookups: Counter
    cache_hits: Counter
    cache_hit_ratio: Gauge
    model_health: Gauge
    budget_used_ratio: Gauge
    outcomes: Counter
    spend: Counter
    consumer_lag: Gauge
    sink_rows: Counter
    sink_lag: Gauge
    sink_retries: Counter
    classifier_info: Gauge


def _total(counter: Counter) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def _hit_ratio(hits: Counter, lookups: Counter) -> Callable[[], float]:
    def ratio() -> float:
        total = _total(lookups)
        return _total(hits) / total if total else 0.0

    return ratio


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Build the bundle on `registry` (a fresh one by default, so tests never collide).

    `cache_hit_ratio` is computed at scrape time from `cache_hits` / `cache_lookups`:
    the cache only increments the two counters."""
    reg = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(
        registry=reg,
        requests=Counter(
            "router_requests_total", "Requests seen, by terminal status",
            ["tenant", "status"], registry=reg,
        ),
        decisions=Counter(
            "router_decisions_total", "Decisions emitted",
            ["tier", "model", "category", "policy"], registry=reg,
        ),
        failed=Counter(
            "router_failed_total", "Failed events emitted, by error code",
            ["error_code"], registry=reg,
        ),
        fallback=Counter(
            "router_fallback_total", "Times the preferred model was skipped for another",
            ["from", "to"], registry=reg,
        ),
        stage_latency=Histogram(
            "router_stage_latency_ms", "Time per pipeline stage in milliseconds",
            ["stage"], buckets=MS_BUCKETS, registry=reg,
        ),
        batch_size=Histogram(
            "router_batch_size", "Micro-batch sizes taken from the stream",
            ["agent"], buckets=BATCH_BUCKETS, registry=reg,
        ),
        cache_lookups=Counter(
            "router_cache_lookups_total", "Decision-cache lookups", registry=reg
        ),
        cache_hits=Counter("router_cache_hits_total", "Decision-cache hits", registry=reg),
        cache_hit_ratio=Gauge(
            "router_cache_hit_ratio", "Decision-cache hits / lookups since start", registry=reg
        ),
        model_health=Gauge(
            "router_model_health", "1 when the model is healthy, 0 when its circuit is open",
            ["model"], registry=reg,
        ),
        budget_used_ratio=Gauge(
            "router_budget_used_ratio", "Tenant spend today / its daily budget",
            ["tenant"], registry=reg,
        ),
        outcomes=Counter(
            "router_outcomes_total", "Outcomes recorded, by model and result",
            ["model", "result"], registry=reg,
        ),
        spend=Counter(
            "router_spend_usd_total", "Estimated spend routed, in USD",
            ["tenant", "model"], registry=reg,
        ),
        consumer_lag=Gauge(
            "router_consumer_lag", "Records behind the partition end",
            ["group", "topic", "partition"], registry=reg,
        ),
        sink_rows=Counter(
            "router_sink_rows_total", "Rows made durable in Postgres", ["status"], registry=reg
        ),
        sink_lag=Gauge(
            "router_sink_lag", "Records consumed by the sink but not yet durable", registry=reg
        ),
        sink_retries=Counter(
            "router_sink_retries_total", "Sink write attempts that failed and were retried",
            registry=reg,
        ),
        classifier_info=Gauge(
            "router_classifier_info", "Loaded classifier (value 1)",
            ["engine", "version"], registry=reg,
        ),
    )
    metrics.cache_hit_ratio.set_function(_hit_ratio(metrics.cache_hits, metrics.cache_lookups))
    return metrics
