"""structlog setup: JSON in production, pretty in a terminal; no prompt text by default."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from router_worker.settings import Settings

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# Keys that may carry prompt text; dropped from every log line unless log_prompts is on.
PROMPT_KEYS = frozenset({"prompt", "messages", "text", "texts", "raw"})


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in PROMPT_KEYS & event.keys():
        event[key] = "[redacted]"
    return event


def configure_logging(settings: Settings) -> None:
    """Configure structlog (and stdlib logging under it) once per process."""
    json_logs = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stderr.isatty()
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not settings.log_prompts:
        processors.append(_redact)
    processors.append(structlog.processors.format_exc_info if json_logs
                      else structlog.dev.set_exc_info)
    processors.append(structlog.processors.JSONRenderer() if json_logs
                      else structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.log_level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
