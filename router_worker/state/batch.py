"""Per micro-batch use of the learned state: cache hits, rate limits, breaker probes,
demotions, budgets, experiments and what to write back, all without I/O."""

from __future__ import annotations

from collections.abc import Sequence

from router_worker.classify.engine import Prediction
from router_worker.config import RoutingConfig, TenantSpec
from router_worker.enrich import Enrichment, WriteBack
from router_worker.errors import ErrorCode, RequestRejected
from router_worker.events import RoutingRequested
from router_worker.metrics import Metrics
from router_worker.policy import Choice, Context, DecisionMemo
from router_worker.state.budget import BudgetLevel, BudgetStatus, budget_status
from router_worker.state.cache import cache_key, encode_prediction
from router_worker.state.experiments import Assignment, choose
from router_worker.state.ratelimit import bucket_size


class BatchPlan:
    """Built before enrichment (cache keys), fed the enrichment, asked once per request."""

    def __init__(
        self, config: RoutingConfig, requests: Sequence[RoutingRequested], texts: Sequence[str],
        classifier_version: str, use_cache: bool,
    ) -> None:
        self.config = config
        # config.version hashes the whole config file, so any change makes new keys
        version = f"{config.version}:{classifier_version}"
        self.keys: list[str] = (
            [cache_key(r.tenant_id, version, t) for r, t in zip(requests, texts, strict=True)]
            if use_cache else []
        )
        self.writes = WriteBack(pin_ttl_s=config.affinity.ttl_s, cache_ttl_s=config.cache.ttl_s)
        self.enrichment = Enrichment()
        self._granted: dict[str, int] = {}
        self._probes_left: set[str] = set()
        self._demoted: dict[str, frozenset[str]] = {}
        self.budgets: dict[str, BudgetStatus] = {}
        self.cache_hits = 0
        self.rate_limited = 0
        # Rankings shared by this batch's requests (see `policy.decide`).
        self.decisions: DecisionMemo = {}

    def use(self, enrichment: Enrichment) -> None:
        """Take in what Redis said about this batch."""
        self.enrichment = enrichment
        self._granted = dict(enrichment.granted)
        self._probes_left = set(enrichment.probes)
        if self.config.budgets.enabled:
            for tenant_id, spend in enrichment.spend.items():
                spec = enrichment.tenants.get(tenant_id) or self.config.tenant(tenant_id)
                status = budget_status(spend, spec.daily_budget_usd,
                                       self.config.budgets.alert_ratio)
                if status is not None:
                    self.budgets[tenant_id] = status

    def cached(self, position: int) -> Prediction | None:
        """The cached classification of the batch's `position`-th valid request, if any."""
        if not self.keys:
            return None
        hit = self.enrichment.cached.get(self.keys[position])
        if hit is not None:
            self.cache_hits += 1
        return hit

    def remember(self, position: int, prediction: Prediction) -> None:
        """Cache a fresh classification."""
        if self.keys:
            self.writes.cache[self.keys[position]] = encode_prediction(prediction)

    def over_rate(self, request: RoutingRequested) -> RequestRejected | None:
        """`rate_limited` for requests beyond what the tenant's bucket granted (batch order)."""
        left = self._granted.get(request.tenant_id)
        if left is None:
            return None
        if left > 0:
            self._granted[request.tenant_id] = left - 1
            return None
        self.rate_limited += 1
        size = bucket_size(self.config.tenant(request.tenant_id))
        limit = f"{size[0]:g}/s, burst {size[1]}" if size else "its limit"
        return RequestRejected(ErrorCode.RATE_LIMITED,
                               f"tenant {request.tenant_id} is over {limit}")

    def context(
        self, request: RoutingRequested, category: str, tenant: TenantSpec,
    ) -> tuple[Context, Assignment | None]:
        """The policy context of one request; raises budget_exceeded for `fail` tenants."""
        enrichment = self.enrichment
        downgrade = False
        status = self.budgets.get(request.tenant_id)
        if status is not None and status.level is BudgetLevel.EXCEEDED:
            if tenant.on_budget_exceeded == "fail":
                raise RequestRejected(
                    ErrorCode.BUDGET_EXCEEDED,
                    f"tenant {request.tenant_id} spent ${status.spend_usd:.4f} of its daily "
                    f"${status.budget_usd:.2f} budget")
            downgrade = True
        unhealthy = enrichment.unhealthy
        if enrichment.probes:  # half-open breakers: a spent probe makes its model unhealthy
            used = enrichment.probes - self._probes_left
            if used:
                unhealthy = unhealthy | used
        assignment = (choose(self.config, request.tenant_id, category, request.request_id,
                             request.session_id) if self.config.experiments else None)
        ctx = Context(
            tenant=tenant, unhealthy=unhealthy,
            session_model=enrichment.session_model(request),
            demoted=self._demoted_for(category), downgrade=downgrade,
            policy_override=(assignment.policy or f"experiment:{assignment.experiment}/"
                             f"{assignment.arm}") if assignment else None,
            models_override=assignment.models if assignment else None,
        )
        return ctx, assignment

    def chosen(self, request: RoutingRequested, choice: Choice,
               assignment: Assignment | None) -> None:
        """Record a decision: a half-open probe is spent, the session pinned, the arm counted."""
        self._probes_left.discard(choice.model)
        if request.session_id is not None and self.config.affinity.enabled:
            self.writes.pins[(request.tenant_id, request.session_id)] = choice.model
        if assignment is not None:
            self.writes.assignments.append(
                (request.request_id, assignment.experiment, assignment.arm))

    def _demoted_for(self, category: str) -> frozenset[str]:
        found = self._demoted.get(category)
        if found is None:
            found = frozenset(
                series.partition("@")[0] for series in self.enrichment.demoted
                if "@" not in series or series.endswith(f"@{category}")
            )
            self._demoted[category] = found
        return found

    def observe(self, metrics: Metrics) -> None:
        """Cache and budget metrics, once per batch."""
        if self.keys:
            metrics.cache_lookups.inc(len(self.keys))
            if self.cache_hits:
                metrics.cache_hits.inc(self.cache_hits)
        for tenant_id, status in self.budgets.items():
            metrics.budget_used_ratio.labels(tenant_id).set(status.ratio)
