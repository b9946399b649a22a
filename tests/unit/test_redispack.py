"""common/redispack.CommandPacker packs exactly what redis-py's own packer does, and fails alike."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.connection import Connection

from common.redispack import KEEP_APART, CommandPacker, one_write

PACKER = CommandPacker()


def _octets(chunks: list[Any]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


def _redis_py(*args: Any) -> bytes:
    return _octets(Connection().pack_command(*args))  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "k", "v"),
        ("SET", "k", "välue ü €"),  # UTF-8
        (b"HSET", b"h", b"f", b"\x00\xff\r\n"),
        ("ZADD", "z", 0.1, "m", 1e22, "n", float("inf"), "o", -0.0, "p"),
        ("INCRBY", "k", -5),
        ("SET", "k", 2**70),
        ("CLIENT SETNAME", "mtaq"),  # redis-py splits a command name with a space
        (b"CONFIG GET", b"maxmemory"),
        ("SET", "k", memoryview(b"a body")),  # written uncopied: redis-py's path
        ("SET", "k", bytearray(b"xyz")),
        ("EVALSHA", "a" * 40, 2, "k1", "k2", *(["x" * 7000] * 3)),  # long values
    ],
)
def test_same_octets_as_redis_py(args: tuple[Any, ...]) -> None:
    assert _octets(PACKER.pack(*args)) == _redis_py(*args)


def test_a_memoryview_is_not_copied() -> None:
    body = memoryview(b"x" * 100_000)
    assert any(chunk is body for chunk in PACKER.pack("SET", "k", body))


@pytest.mark.parametrize("bad", [True, None, object()])
def test_what_redis_py_refuses_is_refused_alike(bad: Any) -> None:
    with pytest.raises(redis.DataError):
        PACKER.pack("SET", "k", bad)


def test_a_string_utf8_cannot_encode_raises_as_before() -> None:
    with pytest.raises(UnicodeEncodeError):
        PACKER.pack("SET", "k", "\udcff")


def test_every_role_connects_with_it() -> None:
    """(Every integration test then sends its commands through it, to a real redis-server.)"""
    from common.redisconn import connect
    from common.settings import Settings

    client = connect(Settings.from_env({}, redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(client.connection_pool.connection_kwargs["command_packer"], CommandPacker)
    assert client.connection_pool.connection_class is one_write(Connection)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("redis://127.0.0.1:1/0", redis.Connection),
        ("unix:///tmp/none.sock", redis.UnixDomainSocketConnection),
        ("rediss://127.0.0.1:1/0", redis.SSLConnection),
    ],
)
def test_each_scheme_keeps_its_connection_class_and_writes_in_one_piece(url: str, base: type[Any]) -> None:
    from common.redisconn import connect
    from common.settings import Settings

    cls = connect(Settings.from_env({}, redis_url=url)).connection_pool.connection_class
    assert issubclass(cls, base) and cls is one_write(base)


def _commit_like(bodies: list[memoryview]) -> list[tuple[Any, ...]]:
    """A group commit's commands as common/store.py queues them (bodies as memoryviews)."""
    cmds: list[tuple[Any, ...]] = [("MULTI",)]
    cmds += [("HSET", f"mtaq:msg:Q{n}", "env", '{"id": 1}', "body", b, "q", "{}") for n, b in enumerate(bodies)]
    return [*cmds, ("ZADD", "mtaq:index", 1.5, "Q0"), ("EXEC",)]


def test_a_pipeline_of_short_pieces_is_one_write() -> None:
    """redis-py writes a 20-message commit of 2 KiB bodies in about 40 sendall calls (a memoryview
    is a piece of its own); one here, with the same octets."""
    ours, theirs = one_write(Connection)(command_packer=PACKER), Connection(command_packer=PACKER)  # type: ignore[no-untyped-call]
    cmds = _commit_like([memoryview(b"x" * 2048) for _ in range(20)])
    joined, pieces = ours.pack_commands(cmds), theirs.pack_commands(cmds)  # type: ignore[no-untyped-call]
    assert len(pieces) > 20 and len(joined) == 1
    assert _octets(joined) == _octets(pieces)


def test_long_pieces_are_written_uncopied_between_joined_runs() -> None:
    big = memoryview(b"y" * KEEP_APART)
    cmds = _commit_like([memoryview(b"x" * 100), big, memoryview(b"z" * 100)])
    ours = one_write(Connection)(command_packer=PACKER)
    out = ours.pack_commands(cmds)
    assert len(out) == 3 and out[1] is big
    assert _octets(out) == _octets(Connection(command_packer=PACKER).pack_commands(cmds))  # type: ignore[no-untyped-call]


def test_a_long_pipeline_of_short_pieces_goes_in_writes_of_keep_apart_at_most() -> None:
    """One sendall must finish within the socket timeout, and Redis reads a plain pipeline only as
    fast as it runs it: the joined writes are bounded, and nothing is copied whole."""
    cmds = [("HSET", f"mtaq:msg:Q{n}", "q", "x" * 300) for n in range(2000)]
    out = one_write(Connection)(command_packer=PACKER).pack_commands(cmds)
    assert len(out) > 5 and all(len(piece) <= KEEP_APART for piece in out)
    assert _octets(out) == _octets(Connection(command_packer=PACKER).pack_commands(cmds))  # type: ignore[no-untyped-call]


def test_its_connections_pickle() -> None:
    """A class made at run time is still a module attribute (a pool handed to a spawned process)."""
    import pickle

    cls = one_write(Connection)
    assert pickle.loads(pickle.dumps(cls)) is cls
