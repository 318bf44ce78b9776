"""How the Postgres writer classifies failures: content (skip the row) or outage (retry)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import asyncpg
import pytest

from router_worker.errors import DependencyUnavailable, RowsRejected
from router_worker.store.connect import connect, create_pool
from router_worker.store.postgres import EventWriter


class FailingPool:
    """Stands in for asyncpg's pool at the one call `_execute` makes."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def execute(self, *args: Any) -> str:
        raise self.exc


def _write_with(exc: BaseException) -> None:
    writer = EventWriter("postgresql://unused", "public")
    writer._pool = FailingPool(exc)  # type: ignore[assignment]
    asyncio.run(writer._execute("SELECT 1", [[1]]))


@pytest.mark.parametrize("exc", [
    ConnectionResetError("reset"),
    asyncpg.CannotConnectNowError("the database system is shutting down"),
    asyncpg.InterfaceError("connection is closed"),
    # a connection lost mid-statement (seen while Postgres shut down): an outage, not a bug
    asyncpg.InternalClientError("cannot switch to state 11; another operation (2) is in progress"),
])
def test_an_outage_is_retried_not_fatal(exc: BaseException) -> None:
    with pytest.raises(DependencyUnavailable):
        _write_with(exc)


def test_a_row_postgres_refuses_is_rejected_not_retried() -> None:
    with pytest.raises(RowsRejected):
        _write_with(asyncpg.DataError("invalid input syntax for type double precision"))


def _closed_port() -> int:
    with socket.socket() as sock:  # bound and closed again: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("opener", ["connect", "create_pool"])
def test_an_unreachable_postgres_is_unavailable_for_every_way_in(opener: str) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{_closed_port()}/test"
    open_it = (connect(dsn, "any") if opener == "connect"
               else create_pool(dsn, "any", min_size=1, max_size=1))
    with pytest.raises(DependencyUnavailable, match="cannot connect to Postgres"):
        asyncio.run(open_it)
