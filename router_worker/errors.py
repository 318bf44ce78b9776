"""The error hierarchy: one root, a stable code and a retriable flag on every error."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Closed set of `routing.failed.v1` error codes; the schema enum is generated from it."""

    INVALID_JSON = "invalid_json"
    SCHEMA_VIOLATION = "schema_violation"
    TOO_LARGE = "too_large"
    NO_ELIGIBLE_MODEL = "no_eligible_model"
    BUDGET_EXCEEDED = "budget_exceeded"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


class RouterError(Exception):
    """Root of every error router-worker raises on purpose."""

    code: str = "router_error"
    retriable: bool = False


class ConfigError(RouterError):
    """The routing config or the settings are invalid; the message names the bad key."""

    code = "config_invalid"


class RequestRejected(RouterError):
    """A request cannot be routed; it becomes a `routing.failed.v1` event with `error_code`."""

    code = "request_rejected"

    def __init__(self, error_code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.error_code = error_code
        self.detail = detail


class DependencyUnavailable(RouterError):
    """A backing service (Redis, Postgres, broker) did not answer; retrying may help."""

    code = "dependency_unavailable"
    retriable = True


class RowsRejected(RouterError):
    """Postgres refused rows for their content (bad data, not an outage); retrying cannot help."""

    code = "rows_rejected"


class EngineUnavailable(RouterError):
    """The classifier engine could not load or run; the cascade falls back to keywords."""

    code = "engine_unavailable"
    retriable = True


class ArtifactError(RouterError):
    """A classifier artifact is missing, corrupt or incompatible with this engine."""

    code = "artifact_invalid"


class EmbeddedStackError(RouterError):
    """An embedded service (broker, Redis, Postgres) failed to start or become healthy."""

    code = "embedded_start_failed"
    retriable = True
