"""The outcome journal: what a worker process has delivered and not yet recorded in Redis, in a file
of its own on the host.

The outcome writer (worker/outcomes.py) records final outcomes in Redis in groups, a few
milliseconds after the remote's reply; a worker killed in between used to forget those deliveries,
and its job, run again once its execution lapsed, sent them a second time (the chaos test: 1-16 of
2,000 messages a run, a worker SIGKILLed every second). Each transaction's outcomes are now also
appended to this file the moment they are handed to the writer: one write(2) of a line, without
fsync, which the kernel keeps when the process dies (a machine lost loses it: at least once, as
before). The file is emptied once nothing waits (REWRITE_AT).

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
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

from common.envelope import RecipientStatus
from common.redisconn import REDIS_AWAY
from common.store import Store
from worker.feedback import Feedback

__all__ = [
    "ADOPT_EVERY",
    "Entries",
    "OutcomeJournal",
    "adopt",
    "decode",
    "encode",
    "journal_at",
    "record_adopted",
]

log = logging.getLogger("mtaq.worker")

ADOPT_EVERY = 2.0  # seconds between looks for a dead process's journal (a glob of one directory)
# A journal that could not be recorded for this long is given up (said, then removed): by then the
# dead worker's job has run again and sent those messages (LEASE_TTL 20 s), and a journal whose
# messages cannot be recorded at all (one of them unreadable) would be read every ADOPT_EVERY.
ABANDON_AFTER = 600.0
# The file keeps the lines already written while others wait (adoption skips recipients Redis has
# final): it is emptied when nothing waits, or written again with what waits once it is this big.
# Cutting it on every write left a kill between the cut and the rewrite with nothing in it.
REWRITE_AT = 64 << 10  # about 250 lines of a transaction each
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
        except (ValueError, TypeError, KeyError, RecursionError):
            bad += 1
    return entries, bad


class OutcomeJournal:
    """This process's journal, open and locked from construction to ``close`` (a context manager).
    Its methods raise OSError (a disk full, an I/O error): the outcome writer then goes on without
    it (worker/outcomes.py ``_journal_failed``)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"
        # made under a name adopters do not look at, locked, then renamed (the lock stays with the
        # file): an adopter never finds it unlocked
        making = self.directory / f"{name}.new"
        self.path = self.directory / f"{name}{SUFFIX}"
        self._pid = os.getpid()
        self._fd = os.open(making, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(making, self.path)
        except OSError:
            os.close(self._fd)
            making.unlink(missing_ok=True)
            raise
        self._size = 0
        self._keep = False

    def append(self, line: bytes) -> None:
        """One write(2) a line. A process killed in it may leave part of the line (``decode`` skips
        it); a short write here is an error, the next line would run on from it."""
        if os.write(self._fd, line) != len(line):
            raise OSError(errno.EIO, f"{self.path.name}: short write")
        self._size += len(line)

    def written(self, waiting: Iterable[bytes]) -> None:
        """A write to Redis is done; ``waiting``: the lines of what still waits (REWRITE_AT)."""
        lines = list(waiting)
        if lines and self._size < REWRITE_AT:
            return
        os.ftruncate(self._fd, 0)  # O_APPEND: the next write goes to the new end
        self._size = 0
        if lines:
            self.append(b"".join(lines))  # one write: a kill between the cut and it is one syscall wide

    def keep(self) -> None:
        """At ``close`` the file stays (outcomes wait in it): its lock goes with the process."""
        self._keep = True

    def close(self) -> None:
        """Close, and remove the file unless it is kept (``keep``): a kept one is adopted by another
        worker once this process has gone (its lock went with the close). Only the process that made
        it removes it: a forked child that ends normally must not take its parent's journal."""
        if self._fd < 0:
            return
        if not self._keep and os.getpid() == self._pid:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> OutcomeJournal:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _read_all(fd: int) -> bytes:
    # os.read on the locked descriptor itself: closing a second descriptor of the file (os.fdopen
    # of a dup) would drop this process's lockf lock on it
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def adopt(
    directory: str | os.PathLike[str],
    own: Path | None,
    record: Callable[[Entries], int],
    *,
    now: Callable[[], float] = time.time,
) -> int:
    """Adopt every journal in ``directory`` whose process is gone (its lock is free): ``record`` its
    entries (it returns how many it wrote), then remove it. A journal whose ``record`` raises
    stays for the next look, until it is ABANDON_AFTER seconds old (Redis away: for as long as it
    is). Returns how many entries were handed to ``record``."""
    total = 0
    for path in sorted(Path(directory).glob(f"*{SUFFIX}")):
        if path == own:
            continue
        try:
            total += _adopt_one(path, record, now)
        except OSError as e:  # one file we cannot read or remove: the others are still adopted
            log.warning("%s: not adopted (%s)", path.name, e)
    return total


def _adopt_one(path: Path, record: Callable[[Entries], int], now: Callable[[], float]) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # lockf's exclusive lock wants it writable
    except FileNotFoundError:  # adopted by another worker meanwhile
        return 0
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return 0  # its process is alive, or another worker is adopting it
            raise
        info = os.fstat(fd)
        if info.st_nlink == 0:
            return 0  # adopted and removed by another worker between our open and our lock
        entries, bad = decode(_read_all(fd))
        if bad:
            log.warning("%s: %d journal line(s) could not be read; those messages may be sent again", path.name, bad)
        if entries:
            try:
                written = record(entries)
            except Exception as e:  # Redis away, most likely: the file stays for the next look
                # given up only when Redis answers and the entries still cannot be recorded (one of
                # them unreadable): with Redis away, what they say may still spare a second copy
                if isinstance(e, REDIS_AWAY) or now() - info.st_mtime < ABANDON_AFTER:
                    log.warning("%s: outcomes not recorded now (%s); tried again in %.0f s", path.name, e, ADOPT_EVERY)
                    return 0
                log.error(
                    "%s: %d outcome(s) not recorded for %.0f s (%s); given up: their jobs have sent them again",
                    path.name,
                    len(entries),
                    ABANDON_AFTER,
                    e,
                )
            else:
                log.info(
                    "adopted %d outcome(s) of a stopped worker process from %s (of %d in it; the others "
                    "recorded already)",
                    written,
                    path.name,
                    len(entries),
                )
        path.unlink(missing_ok=True)
        return len(entries)
    finally:
        os.close(fd)


def record_adopted(store: Store, feedback: Feedback | None, entries: Entries) -> int:
    """A dead process's outcomes that Redis does not have yet, with their events and suppressions;
    the job it died in, run again, finds those recipients final and finishes the messages."""
    qids = list(dict.fromkeys(q for q, _, _ in entries))
    found = dict(zip(qids, store.load_many(qids), strict=True))
    todo = []
    for qid, idx, st in entries:
        got = found.get(qid)
        if got is None:  # finished since
            continue
        msg, statuses = got
        if idx < len(msg.envelope.recipients) and not statuses.get(idx, RecipientStatus()).final:
            todo.append((qid, idx, st))
    if todo:
        messages = {q: got[0] for q, got in found.items() if got is not None}
        extras = feedback.extras(todo, messages) if feedback is not None else {}
        store.set_status_list(todo, **extras)
    return len(todo)


@contextlib.contextmanager
def journal_at(directory: str) -> Iterator[OutcomeJournal | None]:
    """This process's journal in ``directory`` for the ``with`` block; None ("off", or a directory
    we cannot write: said once, and deliveries go on without it, as before the journal). The
    outcome writer closes it first (``OutcomeWriter.close``), keeping the file when outcomes wait."""
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
