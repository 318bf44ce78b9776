"""The faster Redis command packer: byte for byte what redis-py sends."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from router_worker.redis_wire import fast_connection_class

PLAIN = Connection()
FAST = fast_connection_class(Connection)()


def wire(connection: Any, *args: Any) -> bytes:
    return b"".join(bytes(chunk) for chunk in connection.pack_command(*args))


@pytest.mark.parametrize(
    "args",
    [
        ("GET", "k"),
        ("MGET", *(f"rw:cache:{i:032x}" for i in range(600))),
        ("EVALSHA", "a" * 40, 2, "k1", "k2", 3600, b"v1", b"v2"),
        ("SET", "k", b"x" * 100_000, "EX", 60),  # beyond redis-py's chunking cutoff
        ("CONFIG GET", "maxmemory"),  # a command name carrying an argument
        (b"CLIENT SETNAME", "worker"),
        ("SET", "k\u00e9\u4e2d", "\U0001f600", "PX", 1.5),  # non-ASCII text, a float
        ("SET", "k", memoryview(b"view")),
        ("SET", "k", ""),
    ],
)
def test_packs_the_same_bytes_as_redis_py(args: tuple[Any, ...]) -> None:
    assert wire(FAST, *args) == wire(PLAIN, *args)


@given(st.lists(st.one_of(st.text(), st.binary(), st.integers(), st.floats()), max_size=20))
def test_packs_any_arguments_like_redis_py(values: list[Any]) -> None:
    try:
        expected = wire(PLAIN, "RPUSH", "k", *values)
    except UnicodeEncodeError:  # lone surrogates: both refuse
        with pytest.raises(UnicodeEncodeError):
            wire(FAST, "RPUSH", "k", *values)
        return
    assert wire(FAST, "RPUSH", "k", *values) == expected


@pytest.mark.parametrize("bad", [True, None, object()])
def test_rejects_what_redis_py_rejects(bad: object) -> None:
    with pytest.raises(DataError):
        PLAIN.pack_command("SET", "k", bad)
    with pytest.raises(DataError):
        FAST.pack_command("SET", "k", bad)


@pytest.mark.parametrize("base", [Connection, SSLConnection, UnixDomainSocketConnection])
def test_keeps_the_transport_of_the_url(base: type[Any]) -> None:
    fast = fast_connection_class(base)
    assert issubclass(fast, base)
    assert fast_connection_class(base) is fast  # one class per transport
