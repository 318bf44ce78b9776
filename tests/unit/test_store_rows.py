"""Events -> `routing_events` rows: the NUL check may be skipped only where it changes nothing."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from router_worker.store.postgres import Source, may_hold_nul, row_from_event

text = st.text(max_size=20)  # NUL, backslashes and "u0000" included


@settings(max_examples=300, deadline=None)
@given(request_id=text.filter(bool), tenant=text, model=text, detail=text, prompt=text)
def test_a_row_is_the_same_whether_or_not_the_raw_json_let_the_nul_check_be_skipped(
    request_id: str, tenant: str, model: str, detail: str, prompt: str,
) -> None:
    event = {"request_id": request_id, "tenant_id": tenant, "error_detail": detail,
             "decision": {"model": model}, "prompt": prompt,
             "decided_at": "2026-11-26T09:00:00+00:00"}
    raw = orjson.dumps(event)
    source = Source("t", 0, 1)
    checked = row_from_event("completed", orjson.loads(raw), source)
    assert row_from_event("completed", orjson.loads(raw), source,
                          may_hold_nul=may_hold_nul(raw)) == checked
    assert not any(isinstance(v, str) and "\x00" in v for v in checked)


def test_only_json_that_spells_an_escaped_nul_may_hold_one() -> None:
    assert may_hold_nul(orjson.dumps({"a": "x\x00y"}))
    assert may_hold_nul(orjson.dumps({"a": "\\u0000"}))  # an escaped backslash: a false alarm
    assert not may_hold_nul(orjson.dumps({"a": "x y", "b": [1, "u0000"]}))
