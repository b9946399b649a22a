"""The (message, destination) leases this process's jobs hold: one job at a time works on a
message for a destination (common/leasebook.py). A job takes its leases with ``Leases.taken`` and
they end when its block ends, on every path (those of messages its outcomes removed too: they are
fields of the destination's hash, ended in one call), or, on a job's thread of the worker pool,
with the job's success write (``ends_with_success``). While held they are pushed on by the worker's
heartbeat (``renew``: one PEXPIRE a job), so a dead worker's leases lapse within ``ttl``."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis

from common.leasebook import LeaseBook

__all__ = ["Lease", "Leases", "StagedEnd", "end_now", "ends_with_success", "restage", "staged_ends"]

log = logging.getLogger("mtaq.worker")

# The lease ends a job leaves for its success write (``ends_with_success``), per thread: RQ runs a
# job's function and then its success bookkeeping on the job's own thread (worker/pool.py).
_staged = threading.local()


@dataclass(frozen=True, slots=True)
class StagedEnd:
    """A job's leases ended without an error, to be ended in another write's pipeline."""

    book: LeaseBook
    qids: list[str]
    destination: str
    token: str
    done: list[str]

    def queue(self, pipe: Any) -> None:
        self.book.end_in(pipe, self.qids, self.destination, self.token, self.done)


@contextmanager
def ends_with_success() -> Iterator[None]:
    """On this thread, for the block (one job: worker/pool.py ``_perform``), leases that end without
    an error are not ended in a round trip of their own: the end is staged for the job's success
    write (``staged_ends``, worker/rqbook.py ``succeeded``), one writing round trip and fsync a job
    fewer (issue 15). Ends still staged when the block ends (the job failed after its leases'
    block, or its success could not be written) are made then; if Redis is away they lapse with
    their holder key (``ttl``), as a dead worker's leases do, and a drawn list stays for its job's
    re-run, as after a crash."""
    outer: list[StagedEnd] | None = getattr(_staged, "ends", None)
    _staged.ends = []
    try:
        yield
    finally:
        left: list[StagedEnd] = _staged.ends
        if outer is None:
            del _staged.ends
        else:
            _staged.ends = outer
        end_now(left)


def staged_ends() -> list[StagedEnd]:
    """The lease ends staged on this thread, taken: the caller writes them (``StagedEnd.queue``),
    or gives them back with ``restage`` if it could not."""
    ends: list[StagedEnd] = getattr(_staged, "ends", [])
    if ends:
        _staged.ends = []
    return ends


def restage(ends: Sequence[StagedEnd]) -> None:
    """Give back ends taken with ``staged_ends`` whose write failed: they are made with the
    thread's next write of them, or when ``ends_with_success`` exits. (Ending twice does nothing:
    the script ends only the fields that still name the job's token.)"""
    if ends and hasattr(_staged, "ends"):
        _staged.ends[:0] = ends


def end_now(ends: Sequence[StagedEnd]) -> None:
    """Make these ends in one round trip now; with Redis away they lapse with their holder key."""
    if not ends:
        return
    try:
        with ends[0].book.redis.pipeline(transaction=False) as pipe:
            for end in ends:
                end.queue(pipe)
            pipe.execute()
    except redis.RedisError as e:
        log.warning("leases of %d job(s) not ended (%s): they lapse", len(ends), e)


@dataclass(slots=True)
class Lease:
    """One job's leases on its messages for one destination."""

    destination: str
    token: str
    taken: list[str]  # the messages whose lease the job got (the others another job holds)
    renewed: float = 0.0  # when the leases were taken or last pushed on (the Leases' clock)
    # keys to delete with the leases' end if the block ends without an error (Leases.taken ``done``)
    done: list[str] = field(default_factory=list)


class Leases:
    def __init__(self, book: LeaseBook, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.book = book
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, Lease] = {}  # token -> lease

    @contextmanager
    def taken(self, qids: Sequence[str], destination: str) -> Iterator[Lease]:
        """Take the leases of ``qids`` for ``destination``; the block sees which it got. They are
        renewed by the heartbeat while the block runs and ended when it ends, with the keys the
        block put in ``lease.done`` if it ended without an error (in one round trip, or staged for
        the job's success write within ``ends_with_success``)."""
        token = uuid.uuid4().hex
        got = self.book.take(list(qids), destination, token, self.ttl) if qids else []
        lease = Lease(destination, token, got, renewed=self.clock())
        if got:
            with self._lock:
                self._held[token] = lease
        failed = False
        try:
            yield lease
        except BaseException:
            failed = True
            raise
        finally:
            with self._lock:
                self._held.pop(token, None)
            done = [] if failed else lease.done
            if got or done:
                staged: list[StagedEnd] | None = None if failed else getattr(_staged, "ends", None)
                if staged is not None:
                    staged.append(StagedEnd(self.book, got, destination, token, list(done)))
                else:
                    self.book.end(got, destination, token, done)

    def renew(self) -> None:
        """Push on the leases held now that are a quarter of their TTL old (the worker's heartbeat,
        every ttl/4 seconds, calls this): one round trip. A lease lapses ``ttl`` after its holder
        died whenever it was last pushed on; one pushed on at every heartbeat would cost a write a
        job every few seconds, and most jobs end before their leases are that old.
        (A third, with the 20 s TTL that matches the RQ execution's, left a live job's lease 8 s
        from lapsing between two beats; a quarter leaves 10.)"""
        now = self.clock()
        with self._lock:
            due = [x for x in self._held.values() if now - x.renewed >= self.ttl / 4]
            tokens = [x.token for x in due]
        if tokens:
            self.book.renew(tokens, self.ttl)
            with self._lock:
                for x in due:
                    x.renewed = now

    def in_flight(self) -> int:
        """Messages leased by this process's jobs now."""
        with self._lock:
            return sum(len(x.taken) for x in self._held.values())
