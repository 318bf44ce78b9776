"""Versioned SQL migrations, applied once each, in order, under an advisory lock."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

from router_worker.store.connect import connect, quote_ident

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same for every worker racing to migrate.
_LOCK_ID = 0x726F75746572


@dataclass(frozen=True)
class Migration:
    """One SQL file; its version is the file name's numeric prefix."""

    version: str
    name: str
    sql: str


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """All migrations, sorted by version."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        version, _, name = path.stem.partition("_")
        found.append(Migration(version, name, path.read_text()))
    return found


async def _connect_creating(dsn: str, schema: str) -> asyncpg.Connection:
    """A connection whose search_path is the router's schema, created if missing."""
    conn = await connect(dsn)
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
    await conn.execute(f"SET search_path TO {quote_ident(schema)}")
    return conn


async def drop_schema(dsn: str, schema: str) -> None:
    """Drop `schema` and everything in it (a benchmark or test run's own schema)."""
    conn = await connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE")
    finally:
        await conn.close()


async def migrate(dsn: str, schema: str) -> list[str]:
    """Apply pending migrations; returns the versions applied now (empty when up to date)."""
    conn = await _connect_creating(dsn, schema)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in load_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version, migration.name,
                )
            log.info("migration_applied", version=migration.version, name=migration.name)
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
        await conn.close()
    return applied_now
