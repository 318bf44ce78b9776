"""Stage 1: every bad input becomes a Rejected with a stable code and an identity."""

from __future__ import annotations

import base64

import orjson

from router_worker.errors import ErrorCode
from router_worker.events import RoutingRequested
from router_worker.validate import Inbound, Rejected, decode

LIMIT = 64 * 1024


def _inbound(value: bytes | None, key: bytes | None = b"k1") -> Inbound:
    return Inbound(value, key, (), "routing.requested.v1", 2, 17, 0.0)


def test_valid_request_decodes() -> None:
    result = decode(_inbound(orjson.dumps({"request_id": "a", "prompt": "hi"})), LIMIT)
    assert isinstance(result, RoutingRequested)
    assert result.tenant_id == "default"


def test_messages_without_prompt_are_valid_and_text_is_user_turns() -> None:
    body = {"request_id": "a", "messages": [{"role": "system", "content": "be nice"},
                                            {"role": "user", "content": "hello"}]}
    result = decode(_inbound(orjson.dumps(body)), LIMIT)
    assert isinstance(result, RoutingRequested)
    assert result.text() == "hello"


def test_invalid_json_keeps_raw_bytes_and_uses_key() -> None:
    result = decode(_inbound(b"{nope"), LIMIT)
    assert isinstance(result, Rejected)
    assert result.error_code is ErrorCode.INVALID_JSON
    assert result.request_id == "k1"
    assert base64.b64decode(result.raw or "") == b"{nope"


def test_invalid_utf8_is_invalid_json() -> None:
    result = decode(_inbound(b'{"request_id": "\xff\xfe"}'), LIMIT)
    assert isinstance(result, Rejected)
    assert result.error_code is ErrorCode.INVALID_JSON


def test_wrong_type_is_schema_violation_naming_the_field() -> None:
    result = decode(_inbound(orjson.dumps({"request_id": "r9", "prompt": 42})), LIMIT)
    assert isinstance(result, Rejected)
    assert result.error_code is ErrorCode.SCHEMA_VIOLATION
    assert result.request_id == "r9"
    assert "prompt" in result.error_detail


def test_missing_prompt_and_messages_is_schema_violation() -> None:
    result = decode(_inbound(orjson.dumps({"request_id": "r9"})), LIMIT)
    assert isinstance(result, Rejected)
    assert result.error_code is ErrorCode.SCHEMA_VIOLATION


def test_oversized_prompt_is_too_large() -> None:
    result = decode(_inbound(orjson.dumps({"request_id": "big", "prompt": "x" * (LIMIT + 1)})),
                    LIMIT)
    assert isinstance(result, Rejected)
    assert result.error_code is ErrorCode.TOO_LARGE
    assert result.request_id == "big"


def test_no_request_id_and_no_key_is_identified_by_position() -> None:
    result = decode(_inbound(b"[]", key=None), LIMIT)
    assert isinstance(result, Rejected)
    assert result.request_id == "routing.requested.v1:2:17"


def test_null_value_is_invalid_json() -> None:
    result = decode(_inbound(None, key=None), LIMIT)
    assert isinstance(result, Rejected)
    assert result.error_code is ErrorCode.INVALID_JSON
