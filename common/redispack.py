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

``one_write`` gives a connection class that writes a pipeline in one ``sendall``. redis-py's
packs it into pieces of 6,000 octets at most, a memoryview (a message body) its own piece, and
sends each with its own ``sendall``: the ingress's group commit of 20 messages of 2 KiB was about
40 of them. Each one releases the GIL and takes it back, which in a process whose event loop keeps
the GIL busy waits up to ``sys.getswitchinterval()`` (5 ms): such a commit took 48 ms against 6.6
joined (/tmp micro-benchmark, a thread spinning beside it). And Redis, handed the transaction a
piece at a time, woke for each: 26 reads for that commit against 3 (INFO total_reads_processed),
a wake-up a message on issue 15's ceiling load. Pieces of ``KEEP_APART`` octets or more (large
bodies) are still written as they are, uncopied; everything between them is joined into one.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis._parsers.encoders import Encoder
from redis.connection import HiredisRespSerializer, PythonRespSerializer

__all__ = ["KEEP_APART", "CommandPacker", "one_write"]

_PLAIN = frozenset((str, bytes, int, float))
_BUFFER_CUTOFF = 6000  # redis-py's own: values longer than this are sent as their own chunk
# Pieces this long or longer are written as they are; shorter ones are joined, a copy of at most
# this much between two long ones (a few microseconds).
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
        for piece in pieces:
            if len(piece) < KEEP_APART:
                run.append(piece)
                continue
            if run:
                out.append(b"".join(run))
                run = []
            out.append(piece)
        if run:
            out.append(b"".join(run))
        return out


_CLASSES: dict[type[Any], type[Any]] = {}


def one_write(base: type[Any]) -> type[Any]:
    """``base`` (a redis-py connection class) writing a pipeline's short pieces in one ``sendall``:
    the same class for the same base, so that every pool of a process shares it."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES.setdefault(base, type(f"OneWrite{base.__name__}", (_OneWrite, base), {}))
    return cls
