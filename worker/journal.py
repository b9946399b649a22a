"""The outcome journal: what a worker process has delivered and not yet recorded in Redis, in a file
of its own on the host.

The outcome writer (worker/outcomes.py) records final outcomes in Redis in groups, a few
milliseconds after the remote's reply; a worker killed in between used to forget those deliveries,
and its job, run again once its execution lapsed, sent them a second time (the chaos test: 2-16 of
2,000 messages a run, a worker SIGKILLed every second). Each transaction's outcomes are now also
appended to this file the moment they are handed to the writer: one write(2) of a line, without
fsync, which the kernel keeps when the process dies (a machine lost loses it: at least once, as
before). Once a group is in Redis the file is cut back to what still waits.

The file is locked for its process's life, so a journal whose lock can be taken belongs to a dead
process. The lock is a POSIX record lock (lockf), held by the process and not by the file
description: the children it forks (RQ's scheduler) do not hold it on once it died, as flock's did.
Another worker on the host adopts such a journal (at its start, then every ADOPT_EVERY seconds),
writes the outcomes Redis does not have yet, and removes it, well before the dead worker's job is
run again (worker/service.py LEASE_TTL): the re-run finds those recipients final and finishes the
messages instead of sending them again."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

from common.envelope import RecipientStatus

__all__ = ["ADOPT_EVERY", "Entries", "OutcomeJournal", "adopt", "decode", "encode", "journal_at"]

log = logging.getLogger("mtaq.worker")

ADOPT_EVERY = 2.0  # seconds between looks for a dead process's journal (a glob of one directory)
SUFFIX = ".journal"

Entries = list[tuple[str, int, RecipientStatus]]


def encode(entries: Sequence[tuple[str, int, RecipientStatus]]) -> bytes:
    """One journal line: a transaction's outcomes (queue id, recipient position, status)."""
    return json.dumps([[q, i, st.to_json()] for q, i, st in entries], separators=(",", ":")).encode() + b"\n"


def decode(data: bytes) -> tuple[Entries, int]:
    """The entries of a journal's lines, and how many lines could not be read (a file cut short)."""
    entries: Entries = []
    bad = 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            entries.extend((str(q), int(i), RecipientStatus.from_json(s)) for q, i, s in json.loads(line))
        except (ValueError, TypeError, KeyError):
            bad += 1
    return entries, bad


class OutcomeJournal:
    """This process's journal, open and locked from construction to ``close`` (a context manager)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}{SUFFIX}"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        except OSError:
            os.close(self._fd)
            raise

    def append(self, line: bytes) -> None:
        os.write(self._fd, line)  # one line, one write(2): a process killed leaves it whole or not at all

    def keep_only(self, lines: Iterable[bytes]) -> None:
        """Cut the file back to ``lines``: what is recorded in Redis leaves it."""
        os.ftruncate(self._fd, 0)  # O_APPEND: the next write goes to the new end
        data = b"".join(lines)
        if data:
            os.write(self._fd, data)

    def close(self) -> None:
        """A clean exit: the file goes (what it held was written or its job fails and runs again)."""
        if self._fd < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> OutcomeJournal:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def adopt(directory: str | os.PathLike[str], own: Path | None, record: Callable[[Entries], None]) -> int:
    """Adopt every journal in ``directory`` whose process is gone (its lock is free): ``record`` its
    entries, then remove it. A journal whose ``record`` raises stays for the next look. Returns how
    many entries were handed to ``record``."""
    total = 0
    for path in sorted(Path(directory).glob(f"*{SUFFIX}")):
        if path == own:
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # lockf's exclusive lock wants it writable
        except FileNotFoundError:  # adopted by another worker meanwhile
            continue
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    continue  # its process is alive, or another worker is adopting it
                raise
            if os.fstat(fd).st_nlink == 0:
                continue  # adopted and removed by another worker between our open and our lock
            with os.fdopen(os.dup(fd), "rb") as f:
                entries, bad = decode(f.read())
            if bad:
                log.warning("%s: %d journal line(s) could not be read; those messages may be sent again", path, bad)
            if entries:
                try:
                    record(entries)
                except Exception as e:  # Redis away, most likely: the file stays for the next look
                    log.warning("%s: outcomes not recorded now (%s); tried again in %.0f s", path.name, e, ADOPT_EVERY)
                    continue
                log.info("adopted %d outcome(s) of a stopped worker process from %s", len(entries), path.name)
            total += len(entries)
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return total


@contextlib.contextmanager
def journal_at(directory: str) -> Iterator[OutcomeJournal | None]:
    """This process's journal in ``directory`` for the ``with`` block; None ("off", or a directory
    we cannot write: said once, and deliveries go on without it, as before the journal)."""
    if directory == "off":
        yield None
        return
    try:
        journal = OutcomeJournal(directory)
    except OSError as e:
        log.warning(
            "outcome journal off: %s (set journal_dir to a directory this worker can write): a worker "
            "killed sends again what it had delivered and not yet recorded",
            e,
        )
        yield None
        return
    with journal:
        yield journal
