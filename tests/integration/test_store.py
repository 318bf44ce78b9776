"""The Postgres connection helpers against the real server."""

from __future__ import annotations

from router_worker.store.connect import connect, create_pool
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
