"""Outcome events -> `routing_outcomes` rows, one idempotent batched upsert."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from router_worker.events import RoutingOutcome, utcnow

OUTCOME_COLUMNS: tuple[tuple[str, str], ...] = (
    ("request_id", "text"), ("tenant_id", "text"), ("model", "text"), ("policy", "text"),
    ("success", "bool"), ("latency_ms", "float8"), ("input_tokens", "int4"),
    ("output_tokens", "int4"), ("cost_usd", "float8"), ("category", "text"), ("label", "text"),
    ("reported_at", "timestamptz"), ("source_topic", "text"), ("source_partition", "int4"),
    ("source_offset", "int8"),
)


def _upsert_sql() -> str:
    names = ", ".join(name for name, _ in OUTCOME_COLUMNS)
    unnest = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(OUTCOME_COLUMNS, start=1))
    updates = ", ".join(f"{n} = EXCLUDED.{n}" for n, _ in OUTCOME_COLUMNS[1:])
    # A redelivered outcome rewrites the same values; a corrected one (a label added later by
    # a judge) replaces the first: either way one row per request_id.
    return (f"INSERT INTO routing_outcomes ({names}) SELECT * FROM unnest({unnest}) "
            f"ON CONFLICT (request_id) DO UPDATE SET {updates}")


UPSERT_SQL = _upsert_sql()


def outcome_row(event: dict[str, Any], topic: str, partition: int, offset: int) -> tuple[Any, ...]:
    """One row from a parsed outcome event; raises ValueError when it is not one."""
    outcome = RoutingOutcome.model_validate(event)
    reported: datetime = outcome.reported_at or utcnow()
    return (
        outcome.request_id, outcome.tenant_id, outcome.model, outcome.policy, outcome.success,
        outcome.latency_ms, outcome.input_tokens, outcome.output_tokens, outcome.cost_usd,
        outcome.category.value if outcome.category else None,
        outcome.label.value if outcome.label else None, reported, topic, partition, offset,
    )
