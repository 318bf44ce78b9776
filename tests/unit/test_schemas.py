"""schemas/ is generated from the event models; this fails when they drift."""

from __future__ import annotations

import json
from pathlib import Path

from router_worker.errors import ErrorCode
from router_worker.events import json_schemas

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_schema_files_match_the_models() -> None:
    expected = json_schemas()
    on_disk = {p.stem: json.loads(p.read_text()) for p in SCHEMAS.glob("*.json")}
    assert set(on_disk) == set(expected), "run `make schemas`"
    for topic, schema in expected.items():
        assert on_disk[topic] == json.loads(json.dumps(schema)), f"{topic} drifted: make schemas"


def test_failed_schema_error_codes_are_the_closed_enum() -> None:
    failed = json.loads((SCHEMAS / "routing.failed.v1.json").read_text())
    assert failed["$defs"]["ErrorCode"]["enum"] == [c.value for c in ErrorCode]
