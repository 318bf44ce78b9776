"""Connections to Postgres, and which of its failures mean "unavailable": one place for both."""

from __future__ import annotations

from typing import Any

import asyncpg

from router_worker.errors import DependencyUnavailable

# Postgres unreachable, restarting or shutting down: an outage, to retry or to report, never a
# bug. InternalClientError belongs here too: a connection lost mid-statement can leave asyncpg's
# protocol in a state it refuses ("cannot switch to state 11; another operation (2) is in
# progress", seen while the server was shutting down), and uncaught it crashed the sink and
# with it the worker.
UNAVAILABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
               asyncpg.InternalClientError)
CONNECT_TIMEOUT_S = 10


def quote_ident(name: str) -> str:
    """Quote a schema name for SQL (identifiers cannot be bind parameters)."""
    return '"' + name.replace('"', '""') + '"'


def _search_path(schema: str | None) -> dict[str, str]:
    return {"search_path": quote_ident(schema)} if schema is not None else {}


async def connect(dsn: str, schema: str | None = None) -> asyncpg.Connection:
    """One connection, with `schema` (when given) on its search_path; DependencyUnavailable
    when Postgres cannot be reached."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            dsn, timeout=CONNECT_TIMEOUT_S, server_settings=_search_path(schema))
    except UNAVAILABLE as exc:
        raise DependencyUnavailable(f"cannot connect to Postgres: {exc}") from exc
    return conn


async def create_pool(dsn: str, schema: str, **options: Any) -> asyncpg.Pool:
    """A pool whose connections have `schema` on their search_path; DependencyUnavailable
    when Postgres cannot be reached."""
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn, timeout=CONNECT_TIMEOUT_S, server_settings=_search_path(schema), **options)
    except UNAVAILABLE as exc:
        raise DependencyUnavailable(f"cannot connect to Postgres: {exc}") from exc
    return pool
