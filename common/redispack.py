"""How our Redis commands become RESP octets: one call into hiredis's C packer per command.

redis-py's own hiredis serializer runs a Python generator over every argument before it calls the
same C function (an isinstance test and an Encoder.encode call each: ~0.4 us an argument, measured
on a 1,030-argument EVALSHA, 404 us against 67 us here). The ingress's group commit and the worker's
outcome script send tens of arguments a message, so that loop was a few per cent of all the CPU a
message costs. Given only the plain types (str, bytes, int, float), hiredis encodes them exactly as
redis-py does (str as UTF-8, numbers by repr); anything else goes the redis-py way, unchanged:

- a memoryview: redis-py writes it as it is, uncopied (a message body, common/store.py);
- bool, None and other types: redis-py's DataError, as before;
- a command name given with a space in it ("CLIENT SETNAME"): redis-py splits it.

``one_write`` gives a connection class that joins a pipeline's short pieces into writes of up to
``KEEP_APART`` (64 KiB): a group commit of small messages in one or two ``sendall``. redis-py's
packs a pipeline into pieces of 6,000 octets at most, a memoryview (a message body) a piece of
its own, and sends each with its own ``sendall``: the ingress's group commit of 20 messages of
2 KiB was about 40 of them. Each one releases the GIL and takes it back, which in a process whose
event loop keeps the GIL busy waits for it: such a commit took 32 ms against 6.2 joined (/tmp
micro-benchmark, a thread spinning beside it). And Redis, handed the transaction a piece at a
time, woke for each: 26 reads for that commit alone, 8.9 beside the spinning thread, against 3
(INFO total_reads_processed). Pieces of ``KEEP_APART`` octets or more (large bodies) are written
as they are, uncopied.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

__all__ = ["KEEP_APART", "CommandPacker", "one_write"]

_PLAIN = frozenset((str, bytes, int, float))
_BUFFER_CUTOFF = 6000  # redis-py's own: values longer than this are sent as their own chunk
# Pieces this long or longer are written as they are; shorter ones are joined into writes of about
# this much at most (a copy of a few microseconds each). Bounded, not one write a pipeline: the
# socket timeout applies to a whole sendall, and Redis reads a plain pipeline only as fast as it
# runs its commands (a helper's review: 40,000 slow script calls in one write timed out at
# socket_timeout 1 s, where pieces of 6,000 octets took 17 s without a timeout; `mtaq queue release
# --all` is one such pipeline), and a pipeline of hundreds of MiB would be copied whole.
KEEP_APART = 64 * 1024


class CommandPacker:
    """A redis-py ``command_packer`` (stateless: one serves every connection and thread)."""

    def __init__(self) -> None:
        encode = Encoder("utf-8", "strict", False).encode  # type: ignore[no-untyped-call]
        fallback = PythonRespSerializer(_BUFFER_CUTOFF, encode)
        self._redis_py = HiredisRespSerializer(fallback.pack, encode)  # type: ignore[no-untyped-call]

    def pack(self, *args: Any) -> list[Any]:
        first = args[0]
        if (
            set(map(type, args)) <= _PLAIN  # one pass in C; a memoryview or a bool is not plain
            and not (" " in first if type(first) is str else b" " in first)
        ):
            try:
                return [hiredis.pack_command(args)]
            except (TypeError, UnicodeError):
                pass  # redis-py raises the error its callers expect
        packed: list[Any] = self._redis_py.pack(*args)
        return packed


class _OneWrite:
    """The mixin ``one_write`` puts before a redis-py connection class."""

    def pack_commands(self, commands: Any) -> list[Any]:
        pieces: list[Any] = super().pack_commands(commands)  # type: ignore[misc]
        if len(pieces) < 2:
            return pieces
        out: list[Any] = []
        run: list[Any] = []
        size = 0
        for piece in pieces:
            n = len(piece)
            if run and (n >= KEEP_APART or size + n > KEEP_APART):
                out.append(b"".join(run))
                run, size = [], 0
            if n >= KEEP_APART:
                out.append(piece)
            else:
                run.append(piece)
                size += n
        if run:
            out.append(b"".join(run))
        return out


_CLASSES: dict[type[Any], type[Any]] = {}


def one_write(base: type[Any]) -> type[Any]:
    """``base`` (a redis-py connection class) joining a pipeline's short pieces into writes of up to
    KEEP_APART: the same class for the same base, so that every pool of a process shares it."""
    cls = _CLASSES.get(base)
    if cls is None:
        name = f"OneWrite{base.__name__}"
        cls = _CLASSES.setdefault(base, type(name, (_OneWrite, base), {"__module__": __name__}))
        # a module attribute, so that a connection pickles (a pool handed to a spawned process)
        globals().setdefault(name, cls)
    return cls
