"""The Postgres connection helpers and the event writer against the real server."""

from __future__ import annotations

import orjson
import pytest
from aiokafka import ConsumerRecord

from router_worker import topics
from router_worker.agents.sink import SinkAgent, rows_from_records
from router_worker.errors import RowsRejected
from router_worker.metrics import create_metrics
from router_worker.store.connect import connect, create_pool
from router_worker.store.postgres import EventWriter, Source, row_from_event
from tests.conftest import settings_from


async def test_a_connection_and_a_pool_see_the_routers_schema_unqualified(
    isolated: dict[str, str],
) -> None:
    settings = settings_from(isolated)
    dsn, schema = settings.database_url.get_secret_value(), settings.database_schema
    conn = await connect(dsn, schema)
    try:
        assert await conn.fetchval("SELECT current_schema()") == schema
        assert await conn.fetchval("SELECT count(*) FROM routing_events") == 0
    finally:
        await conn.close()
    pool = await create_pool(dsn, schema, min_size=1, max_size=1)
    try:
        assert await pool.fetchval("SELECT current_schema()") == schema
    finally:
        await pool.close()


def _completed(request_id: str, confidence: object = 0.9) -> dict[str, object]:
    return {"request_id": request_id, "tenant_id": "acme",
            "decision": {"model": "m", "confidence": confidence},
            "decided_at": "2026-11-26T09:00:00+00:00"}


def _record(topic: str, offset: int, event: dict[str, object]) -> ConsumerRecord[bytes, bytes]:
    value = orjson.dumps(event)
    return ConsumerRecord(topic, 0, offset, 0, 0, None, value, None, 0, len(value), ())


async def _request_ids(dsn: str, schema: str) -> list[str]:
    conn = await connect(dsn, schema)
    try:
        return sorted(r["request_id"] for r in await conn.fetch(
            "SELECT request_id FROM routing_events"))
    finally:
        await conn.close()


async def test_redelivered_and_repeated_events_land_once(isolated: dict[str, str]) -> None:
    settings = settings_from(isolated)
    dsn, schema = settings.database_url.get_secret_value(), settings.database_schema
    writer = EventWriter(dsn, schema)
    rows = [row_from_event("completed", _completed(f"r{i % 3}"), Source("t", 0, i))
            for i in range(6)]
    try:
        assert await writer.write(rows) == 3  # r0, r1, r2 twice each within the batch
        later = row_from_event("completed", _completed("r3"), Source("t", 0, 6))
        assert await writer.write([*rows[:2], later]) == 1  # r0 and r1 are stored already
    finally:
        await writer.stop()
    assert await _request_ids(dsn, schema) == ["r0", "r1", "r2", "r3"]


async def test_a_row_that_fits_no_column_is_skipped_and_counted_the_rest_land(
    isolated: dict[str, str],
) -> None:
    settings = settings_from(isolated)
    dsn, schema = settings.database_url.get_secret_value(), settings.database_schema
    metrics = create_metrics()
    sink = SinkAgent(settings, metrics)
    topic = settings.topic(topics.COMPLETED)
    records = [_record(topic, 0, _completed("good-1")),
               _record(topic, 1, _completed("bad", confidence="very")),  # not a float8
               _record(topic, 2, _completed("good-2"))]
    try:
        with pytest.raises(RowsRejected):  # the writer refuses the batch as a whole ...
            await sink.writer.write(rows_from_records(records, sink.status_of))
        await sink._write_until_durable(records)  # ... the sink then goes row by row
        await sink._write_until_durable([_record(topic, 3, _completed("good-3"))])
    finally:
        await sink.writer.stop()
    assert await _request_ids(dsn, schema) == ["good-1", "good-2", "good-3"]
    assert metrics.sink_rows.labels("rejected")._value.get() == 1
    assert metrics.sink_rows.labels("completed")._value.get() == 3


async def test_routing_events_keeps_only_the_indexes_a_query_uses(
    isolated: dict[str, str],
) -> None:
    settings = settings_from(isolated)
    conn = await connect(settings.database_url.get_secret_value(), settings.database_schema)
    try:
        indexes = {r["indexname"]: r["indexdef"] for r in await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1 "
            "AND tablename = 'routing_events'", settings.database_schema)}
    finally:
        await conn.close()
    assert set(indexes) == {"routing_events_pkey", "routing_events_tenant_created_idx",
                            "routing_events_decided_idx", "routing_events_failed_idx"}
    assert "WHERE (status = 'failed'::text)" in indexes["routing_events_failed_idx"]


async def test_a_connection_that_lost_its_staging_table_makes_it_again(
    isolated: dict[str, str],
) -> None:
    settings = settings_from(isolated)
    dsn, schema = settings.database_url.get_secret_value(), settings.database_schema
    writer = EventWriter(dsn, schema)
    try:
        await writer.start()
        assert writer._pool is not None
        await writer._pool.execute("DISCARD ALL")  # drops the connection's temporary tables
        row = row_from_event("completed", _completed("after-discard"), Source("t", 0, 1))
        assert await writer.write([row]) == 1
    finally:
        await writer.stop()
    assert await _request_ids(dsn, schema) == ["after-discard"]
