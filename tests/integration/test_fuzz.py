"""Bad input never crashes the route agent and never vanishes: 10,000 random and adversarial
records each become exactly one completed or failed event and one row."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from router_worker import topics
from router_worker.errors import ErrorCode
from router_worker.events import RoutingRequested
from router_worker.kafka import producer_options
from router_worker.validate import Inbound, Rejected, decode
from tests.conftest import settings_from
from tests.integration.test_reliability import read_outputs, ready, wait_for_rows
from tests.integration.workers import WorkerProcess

MAX_PROMPT = 65536
# decode() refuses to parse a value this large; it is identified by key or position only
_UNPARSED_ABOVE = MAX_PROMPT * 4 + 64 * 1024

# --- strategies ----------------------------------------------------------------------------

json_leaf = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
             | st.text(max_size=40))
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=12,
)
text = st.text(max_size=60)  # any code point but lone surrogates, NUL included
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", ""]) | json_leaf},
    optional={"content": text | json_value}), max_size=3)
request_fields = st.fixed_dictionaries(
    {},
    optional={
        "request_id": text | json_leaf,
        "tenant_id": st.sampled_from(["default", "acme-budget", ""]) | text | json_leaf,
        "session_id": text | json_leaf,
        "prompt": text | json_value,
        "messages": messages | json_value,
        "task_hint": st.sampled_from(["code", "math", "nonsense"]) | json_leaf,
        "constraints": st.fixed_dictionaries({}, optional={
            "max_cost_usd": st.floats(allow_nan=False) | json_leaf,
            "max_latency_ms": st.integers() | json_leaf,
            "required_capabilities": st.lists(text, max_size=3) | json_leaf,
            "allowed_models": st.lists(st.sampled_from(["gpt-4o-mini", "o3", "nope"]),
                                       max_size=3) | json_leaf,
            "denied_models": st.lists(text, max_size=2) | json_leaf}) | json_value,
        "created_at": st.datetimes().map(lambda d: d.isoformat()) | text | json_leaf,
        "metadata": json_value,
    },
)
# plus unknown fields, which the event model ignores
request_like = st.tuples(request_fields, st.dictionaries(text, json_value, max_size=2)).map(
    lambda parts: {**parts[1], **parts[0]})

# well-formed requests with adversarial text: most of these should be decided
valid_like = st.fixed_dictionaries(
    {"request_id": text.filter(str.strip), "prompt": text | st.text(min_size=200, max_size=3000)},
    optional={"tenant_id": st.sampled_from(["default", "acme-budget"]) | text.filter(str.strip),
              "session_id": text, "metadata": json_value,
              "constraints": st.fixed_dictionaries({}, optional={
                  "required_capabilities": st.lists(st.sampled_from(["code", "vision", "x"]),
                                                    max_size=2),
                  "max_cost_usd": st.floats(0, 1)})},
)


def dumps(value: Any) -> bytes:
    # stdlib json: integers beyond 64 bits and infinities (not JSON) pass through as written
    return json.dumps(value, ensure_ascii=False).encode()


value_bytes = st.one_of(
    valid_like.map(dumps),
    valid_like.map(dumps),
    request_like.map(dumps),
    json_value.map(dumps),
    st.binary(max_size=200),  # mostly invalid JSON, often invalid UTF-8
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.none(),  # a null value (a tombstone)
)
headers = st.lists(st.tuples(st.sampled_from(["correlation_id", "traceparent", "x"]) | text,
                             st.binary(max_size=40)), max_size=3)
key_kind = st.sampled_from(["id", "id", "null", "garbage", "empty"])


@dataclass(frozen=True)
class Spec:
    """One fuzzed record as generated: what to send and how its key is formed."""

    value: bytes | None
    key_kind: str
    garbage: bytes
    headers: list[tuple[str, bytes]]


specs = st.builds(Spec, value_bytes, key_kind, st.binary(max_size=12), headers)


def generate(n: int) -> list[Spec]:
    """n records drawn by hypothesis (deterministic seed, no shrinking, no database)."""
    drawn: list[Spec] = []

    @settings(max_examples=n, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), deadline=None)
    @given(specs)
    def collect(spec: Spec) -> None:
        drawn.append(spec)

    collect()
    return drawn


def adversarial() -> list[Spec]:
    """Hand-written extremes hypothesis would rarely reach."""
    huge = "x" * (2 * 1024 * 1024)
    values: list[bytes | None] = [
        orjson.dumps({"request_id": "R", "prompt": huge}),  # far beyond the size limit
        orjson.dumps({"request_id": "R", "prompt": "y" * (MAX_PROMPT + 1)}),
        b"[" * 200_000 + b"]" * 200_000,  # nesting far past orjson's limit
        b'{"request_id": "R", "prompt": "ok", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"\xff\xfe\xfd" * 1000,
        b"\x00" * 100,
        orjson.dumps({"request_id": "R\u0000nul", "prompt": "nul in the id"}),
        orjson.dumps({"request_id": "R", "tenant_id": "t\u0000nul", "prompt": "nul tenant"}),
        orjson.dumps({"request_id": "R", "prompt": "\u0000" * 50}),
        orjson.dumps({"request_id": "R", "messages": [{"role": "user", "content": [
            {"text": "a"}, "not a dict", {"text": {"nested": 1}}]}]}),
        orjson.dumps({"request_id": "R" * 300, "prompt": "id too long"}),
        orjson.dumps({"request_id": "R", "prompt": "p", "constraints": {"max_cost_usd": -1}}),
        orjson.dumps({"request_id": "R", "prompt": "p", "constraints": {"allowed_models": []}}),
        orjson.dumps(["R"]),
        b"",
        None,
    ]
    return [Spec(v, kind, b"\xc3\x28", [("correlation_id", b"\xff" * 8), ("", b"")])
            for v in values for kind in ("id", "null")]


# --- building records and predicting their identity ------------------------------------------


@dataclass
class Record:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    identity: str | None  # None: topic:partition:offset, known once produced


def _unique_request_id(value: bytes | None, index: int) -> bytes | None:
    """Make a string request_id unique per record (so every record has its own identity)."""
    if value is None or len(value) > _UNPARSED_ABOVE:
        return value
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value
    if isinstance(parsed, dict) and isinstance(parsed.get("request_id"), str):
        parsed["request_id"] = f"fz{index}:{parsed['request_id'][:100]}"
        return orjson.dumps(parsed)
    return value


def build(spec: Spec, index: int) -> Record:
    key = {"id": f"fz-{index}".encode(), "null": None, "empty": b"",
           "garbage": spec.garbage + f"#{index}".encode()}[spec.key_kind]
    value = _unique_request_id(spec.value, index)
    if key is None and value is None:
        key = b""  # aiokafka refuses a record with neither; an empty key identifies nothing
    return Record(key, value, spec.headers, predict_identity(key, value))


def predict_identity(key: bytes | None, value: bytes | None) -> str | None:
    """The README's rule: request_id from the JSON, else the key, else the position."""
    raw = value or b""
    if len(raw) <= _UNPARSED_ABOVE:
        try:
            parsed: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            rid = parsed.get("request_id")
            if isinstance(rid, str) and rid.strip():
                return rid[:256]
    if key:
        text_key = key.decode("utf-8", errors="replace").strip()
        if text_key:
            return text_key[:256]
    return None


def row_id(identity: str) -> str:
    # Postgres text cannot hold NUL; the sink stores U+FFFD in its place.
    return identity.replace("\x00", "\ufffd")


async def produce(env: dict[str, str], records: list[Record]) -> list[str]:
    """Send every record; returns each one's identity (positions filled in from the broker)."""
    config = settings_from(env)
    topic = config.topic(topics.REQUESTED)
    producer = AIOKafkaProducer(**producer_options(config))
    await producer.start()
    try:
        futures = [await producer.send(topic, r.value, key=r.key, headers=r.headers)
                   for r in records]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [r.identity or f"{topic}:{m.partition}:{m.offset}"
            for r, m in zip(records, metas, strict=True)]


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
async def test_ten_thousand_fuzzed_records_each_yield_exactly_one_terminal_event(
    isolated: dict[str, str], workdir: Path,
) -> None:
    began = time.monotonic()
    # 4,984 drawn records, each sent with two kinds of key, plus 32 hand-written extremes
    drawn = generate(4_984)
    variants = [Spec(s.value, kind, s.garbage, s.headers)
                for s in drawn for kind in (s.key_kind, "null" if s.key_kind != "null" else "id")]
    records = [build(s, i) for i, s in enumerate(variants + adversarial())]
    generated_s = time.monotonic() - began
    config = settings_from(isolated)
    worker = WorkerProcess(isolated, workdir, "w-fuzz").start()
    try:
        await worker.wait_ready()
        identities = await produce(isolated, records)
        assert len(set(identities)) == len(identities) == 10_000
        expected_rows = {row_id(i) for i in identities}
        rows = await wait_for_rows(config, expected_rows, timeout=120)
        outputs = await read_outputs(config, set(identities), timeout=60)
        alive = worker.proc is not None and worker.proc.poll() is None and await ready(worker)
        log_text = worker.log_path.read_text(errors="replace")
    finally:
        worker.stop()
    statuses = Counter(
        "completed" if "decision" in v else str(v.get("error_code"))
        for values in outputs.values.values() for v in values)
    print(f"\n[fuzz] generated_s={generated_s:.1f} records={len(records)} "
          f"outputs={len(outputs.keys)} rows={len(rows)} statuses={dict(statuses)}")
    assert alive, worker.tail()
    # exactly one event per record, matched by its key (request_id, Kafka key or position)
    assert Counter(outputs.keys) == Counter(identities)
    assert Counter(rows) == Counter(expected_rows)
    assert set(statuses) <= {"completed", *(c.value for c in ErrorCode)}
    assert statuses["completed"] > 0
    assert statuses["invalid_json"] > 0
    assert "route_batch_crashed" not in log_text, log_text[-3000:]


inbounds = st.builds(
    Inbound,
    value=value_bytes | request_like.map(dumps) | st.binary(max_size=300),
    key=st.none() | st.binary(max_size=20),
    headers=st.just(()),
    topic=st.just("t"),
    partition=st.integers(0, 3),
    offset=st.integers(0, 2**40),
    timestamp_ms=st.floats(0, 2e12),
)


@settings(max_examples=1500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(inbounds, st.integers(1, 100_000))
def test_decode_never_raises_and_always_names_the_record(inbound: Inbound, limit: int) -> None:
    result = decode(inbound, limit)
    assert isinstance(result, RoutingRequested | Rejected)
    if isinstance(result, Rejected):
        assert result.request_id
        assert result.error_code in {ErrorCode.INVALID_JSON, ErrorCode.SCHEMA_VIOLATION,
                                     ErrorCode.TOO_LARGE}
        # the failed event must be serialisable whatever the input was
        orjson.dumps({"request_id": result.request_id, "detail": result.error_detail,
                      "raw": result.raw, "tenant_id": result.tenant_id})
    else:
        assert len(result.text().encode("utf-8", errors="surrogatepass")) <= limit
