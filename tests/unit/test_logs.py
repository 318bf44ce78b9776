"""Log lines: JSON in production, ids on every request line, no prompt text unless enabled."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
from structlog.testing import LogCapture, capture_logs

from router_worker.agents.route import Router
from router_worker.classify.cascade import Cascade
from router_worker.classify.keyword import keyword_engine_from_config
from router_worker.config import load_config
from router_worker.logs import (
    configure_logging,
    processors,
    quiet_kafka_client_logs,
    redact_prompts,
)
from router_worker.metrics import create_metrics
from router_worker.settings import DEFAULT_CONFIG, Settings
from router_worker.validate import Inbound

CANARY = "CANARY-unit-5e1d"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _captured(settings: Settings, **event: Any) -> dict[str, Any]:
    """Run one event through the configured chain (minus the renderer) and return it."""
    capture = LogCapture()
    chain = processors(settings, json_logs=True)[:-1]
    structlog.configure(processors=[*chain, capture])
    structlog.get_logger().info("request_received", **event)
    assert len(capture.entries) == 1
    return dict(capture.entries[0])


def test_prompt_keys_are_replaced_by_hash_and_length_by_default() -> None:
    entry = _captured(Settings(), request_id="r1", prompt=CANARY, messages=[{"content": CANARY}],
                      text=CANARY, raw=CANARY.encode())
    assert CANARY not in repr(entry)
    assert entry["request_id"] == "r1"
    assert entry["prompt"].startswith("[redacted sha256:")
    assert entry["prompt"].endswith(f"len={len(CANARY)}]")
    assert entry["prompt"] == entry["raw"]  # same bytes, same fingerprint


def test_log_prompts_true_turns_the_redaction_processor_off() -> None:
    settings = Settings(log_prompts=True)
    assert redact_prompts not in processors(settings, json_logs=True)
    assert redact_prompts in processors(Settings(), json_logs=True)
    entry = _captured(settings, request_id="r1", prompt=CANARY)
    assert entry["prompt"] == CANARY


def test_context_ids_are_merged_into_every_line() -> None:
    structlog.contextvars.bind_contextvars(request_id="r9", correlation_id="c9", tenant_id="t9")
    entry = _captured(Settings(), stage="enrich")
    assert (entry["request_id"], entry["correlation_id"], entry["tenant_id"]) == ("r9", "c9", "t9")


def test_json_format_writes_one_json_object_per_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    configure_logging(Settings(log_format="json"))
    structlog.get_logger("t").info("decided", request_id="r1", prompt=CANARY)
    line = json.loads(out.getvalue().strip())
    assert (line["event"], line["request_id"], line["level"]) == ("decided", "r1", "info")
    assert "timestamp" in line
    assert CANARY not in out.getvalue()


def test_auto_format_is_json_when_stderr_is_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()  # isatty() is False, as under a container runtime or systemd
    monkeypatch.setattr("sys.stderr", out)
    configure_logging(Settings(log_format="auto"))
    structlog.get_logger("t").warning("slow_batch", records=3)
    assert json.loads(out.getvalue())["records"] == 3


def test_console_format_is_human_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    configure_logging(Settings(log_format="console"))
    structlog.get_logger("t").info("decided", request_id="r1")
    text = out.getvalue()
    assert "decided" in text
    assert "request_id" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def _inbound(value: bytes, key: bytes, headers: tuple[tuple[str, bytes], ...] = ()) -> Inbound:
    return Inbound(value=value, key=key, headers=headers, topic="routing.requested.v1",
                   partition=0, offset=1, timestamp_ms=0.0)


async def test_router_log_lines_carry_ids_and_never_the_prompt() -> None:
    config = load_config(DEFAULT_CONFIG)
    cascade = Cascade(None, keyword_engine_from_config(config), config.thresholds)
    # debug: the level at which every decision gets its own `request_decided` line
    settings = Settings(engine="keyword", log_level="debug")
    router = Router(settings, config, cascade, None, create_metrics())
    batch = [
        _inbound(orjson.dumps({"request_id": "ok-1", "tenant_id": "acme-budget",
                               "prompt": f"hello {CANARY}"}), b"ok-1",
                 (("correlation_id", b"corr-1"), ("traceparent", b"00-abc-def-01"))),
        _inbound(b'{"request_id": "bad-1", "prompt": "' + CANARY.encode(), b"bad-1"),
        _inbound(orjson.dumps({"request_id": "none-1", "prompt": CANARY,
                               "constraints": {"allowed_models": ["nope"]}}), b"none-1"),
    ]
    with capture_logs() as logs:
        out = await router.route(batch)
    assert [o.status for o in out] == ["completed", "failed", "failed"]
    assert CANARY not in repr(logs)
    by_id = {line["request_id"]: line for line in logs if "request_id" in line}
    assert set(by_id) == {"ok-1", "bad-1", "none-1"}
    assert by_id["ok-1"]["correlation_id"] == "corr-1"
    assert by_id["ok-1"]["tenant_id"] == "acme-budget"
    assert by_id["bad-1"]["correlation_id"] == "bad-1"
    assert by_id["none-1"]["tenant_id"] == "default"
    assert by_id["none-1"]["error_code"] == "no_eligible_model"


def test_kafka_client_debug_records_are_never_built_even_under_a_debug_root() -> None:
    # aiokafka's DEBUG line per produced record carries the record value: the prompt.
    root = logging.getLogger()
    before = root.level, logging.getLogger("aiokafka").level
    try:
        root.setLevel(logging.DEBUG)
        quiet_kafka_client_logs(Settings(log_level="debug"))
        assert not logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(before[0])
        logging.getLogger("aiokafka").setLevel(before[1])
