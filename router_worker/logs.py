"""structlog setup: JSON in production, pretty in a terminal; no prompt text by default."""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Any

import structlog

from router_worker.settings import Settings

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# Keys that may carry prompt text; replaced by hash + length unless log_prompts is on.
PROMPT_KEYS = frozenset({"prompt", "messages", "text", "texts", "raw"})


def _fingerprint(value: Any) -> str:
    # Hash and length let an operator match a log line to a stored prompt without the text.
    data = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
    return f"[redacted sha256:{hashlib.sha256(data).hexdigest()[:12]} len={len(data)}]"


def redact_prompts(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: replace prompt-carrying keys by a hash and a length."""
    for key in PROMPT_KEYS & event.keys():
        event[key] = _fingerprint(event[key])
    return event


def processors(settings: Settings, json_logs: bool) -> list[Any]:
    """The processor chain: context ids, level, time, prompt redaction (unless log_prompts)."""
    chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not settings.log_prompts:
        chain.append(redact_prompts)
    chain.append(structlog.processors.format_exc_info if json_logs
                 else structlog.dev.set_exc_info)
    chain.append(structlog.processors.JSONRenderer() if json_logs
                 else structlog.dev.ConsoleRenderer())
    return chain


def quiet_kafka_client_logs(settings: Settings) -> None:
    """Keep aiokafka's stdlib loggers at INFO or above, whatever the root level.

    aiokafka logs every produced record at DEBUG with its key and value (the prompt), and Faust's
    terminal spinner sets the root logger to DEBUG: every record then cost a LogRecord (~6% of
    the route agent's time) and one debug handler away from a prompt in the logs.
    """
    level = max(_LEVELS[settings.log_level], logging.INFO)
    logging.getLogger("aiokafka").setLevel(level)


def configure_logging(settings: Settings) -> None:
    """Configure structlog (and stdlib logging under it) once per process."""
    json_logs = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stderr.isatty()
    )
    structlog.configure(
        processors=processors(settings, json_logs),
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.log_level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
