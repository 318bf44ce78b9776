"""Event models: the one source of truth for every topic's payload; schemas/ is generated."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from router_worker.errors import ErrorCode


class Category(StrEnum):
    """What a prompt asks for; the classifier's first head."""

    CODE = "code"
    MATH = "math"
    REASONING = "reasoning"
    RESEARCH = "research"
    CREATIVE = "creative"
    CHAT = "chat"
    SUMMARIZE = "summarize"
    OPS = "ops"


class Complexity(StrEnum):
    """Whether a small model answers it well (simple) or it needs a strong one (complex)."""

    SIMPLE = "simple"
    COMPLEX = "complex"


class Tier(StrEnum):
    """Which stage of the cascade produced the decision."""

    CACHE = "cache"
    CLASSIFIER = "classifier"
    ENCODER = "encoder"
    FUZZY = "fuzzy"
    KEYWORD = "keyword"
    DEFAULT = "default"


CATEGORIES: tuple[str, ...] = tuple(c.value for c in Category)
COMPLEXITIES: tuple[str, ...] = tuple(c.value for c in Complexity)


def utcnow() -> datetime:
    """Timezone-aware now; every timestamp we write is UTC."""
    return datetime.now(UTC)


def round_half_up(value: float, scale: float) -> float:
    """A non-negative value rounded to 1/`scale` (1e3: three decimals), half up, for event
    fields: what `round(value, digits)` gives unless the value sits within a rounding error of
    a half, in a third of its time (round renders the float as decimal digits, ~0.7 us)."""
    return int(value * scale + 0.5) / scale


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Message(_Event):
    """One OpenAI-style chat message."""

    role: str = Field(min_length=1, max_length=64)
    content: str | list[dict[str, Any]] = ""


class Constraints(_Event):
    """Caller limits on the decision."""

    max_cost_usd: float | None = Field(None, ge=0)
    max_latency_ms: int | None = Field(None, ge=0)
    required_capabilities: list[str] = Field(default_factory=list)
    allowed_models: list[str] | None = None
    denied_models: list[str] = Field(default_factory=list)


# The default of every request without constraints: one shared, frozen instance (through a
# factory, so the JSON schema shows no default object). Building a fresh one per request was
# a third of the cost of validating a typical request (~2.4 us).
NO_CONSTRAINTS = Constraints()


def _no_constraints() -> Constraints:
    return NO_CONSTRAINTS


class RoutingRequested(_Event):
    """`routing.requested.v1`: a service asks which model should serve a prompt."""

    request_id: str = Field(min_length=1, max_length=256)
    tenant_id: str = Field("default", min_length=1, max_length=256)
    session_id: str | None = Field(None, max_length=256)
    prompt: str | None = None
    messages: list[Message] | None = None
    task_hint: Category | None = None
    constraints: Constraints = Field(default_factory=_no_constraints)
    created_at: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _needs_text(self) -> RoutingRequested:
        if self.prompt is None and not self.messages:
            raise ValueError("one of 'prompt' or 'messages' is required")
        return self

    def text(self) -> str:
        """The text the classifier sees: the prompt, or the user turns of `messages`."""
        if self.prompt is not None:
            return self.prompt
        parts: list[str] = []
        for message in self.messages or ():
            if message.role != "user":
                continue
            if isinstance(message.content, str):
                parts.append(message.content)
            else:
                parts.extend(str(p.get("text", "")) for p in message.content if isinstance(p, dict))
        return "\n".join(parts)


class Alternative(_Event):
    """A runner-up model with its score."""

    model: str
    score: float


class Decision(_Event):
    """The routing decision itself."""

    model: str
    provider: str
    fallbacks: list[str]
    alternatives: list[Alternative]
    policy: str
    category: Category
    complexity: Complexity
    confidence: float = Field(ge=0, le=1)
    tier: Tier
    reason: str
    estimated_cost_usd: float = Field(ge=0)


class Timings(_Event):
    """Milliseconds spent per stage."""

    queue: float = 0.0
    enrich: float = 0.0
    classify: float = 0.0
    total: float = 0.0


class RoutingCompleted(_Event):
    """`routing.completed.v1`: the decision for one request."""

    request_id: str
    tenant_id: str
    decision: Decision
    classifier_version: str
    degraded: list[str] = Field(default_factory=list)
    timings_ms: Timings = Field(default_factory=Timings)
    created_at: datetime | None = None
    decided_at: datetime
    prompt: str | None = Field(
        None, description="the prompt text, only for tenants with store_prompts: true"
    )


class RoutingFailed(_Event):
    """`routing.failed.v1`: a request that could not be routed, and why."""

    request_id: str
    tenant_id: str | None = None
    error_code: ErrorCode
    error_detail: str
    raw: str | None = Field(None, description="base64 of the original bytes when undecodable")
    created_at: datetime | None = None
    failed_at: datetime


class RoutingOutcome(_Event):
    """`routing.outcome.v1`: what the caller saw when it used a decision."""

    request_id: str = Field(min_length=1, max_length=256)
    tenant_id: str = "default"
    model: str
    success: bool
    latency_ms: float = Field(ge=0)
    input_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(0, ge=0)
    cost_usd: float = Field(0.0, ge=0)
    category: Category | None = None
    label: Category | None = None
    policy: str | None = Field(None, max_length=256, description="the decision's policy, echoed")
    reported_at: datetime | None = None


class RoutingAlert(_Event):
    """`routing.alerts.v1`: something an operator should know, raised once per window."""

    alert_id: str = Field(description="stable per kind, subject and window: dedupe key")
    kind: Literal["budget_warning", "budget_exceeded"]
    tenant_id: str
    window: Literal["daily", "weekly", "monthly"]
    window_id: str
    spend_usd: float = Field(ge=0)
    budget_usd: float = Field(ge=0)
    ratio: float = Field(ge=0)
    raised_at: datetime


EVENT_MODELS: dict[str, type[BaseModel]] = {
    "routing.requested.v1": RoutingRequested,
    "routing.completed.v1": RoutingCompleted,
    "routing.failed.v1": RoutingFailed,
    "routing.outcome.v1": RoutingOutcome,
    "routing.alerts.v1": RoutingAlert,
}

Status = Literal["completed", "failed"]


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every topic's payload, keyed by topic name."""
    schemas = {}
    for topic, model in EVENT_MODELS.items():
        schema = model.model_json_schema()
        schema["$id"] = f"https://router-worker.dev/schemas/{topic}.json"
        schema["title"] = topic
        schemas[topic] = schema
    return schemas


def write_schemas(directory: Path) -> list[Path]:
    """Regenerate `schemas/*.json` from the models (run by `make schemas`)."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for topic, schema in json_schemas().items():
        path = directory / f"{topic}.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    import sys

    for written_path in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas")):
        print(written_path)
