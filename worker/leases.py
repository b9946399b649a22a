"""The (message, destination) leases this process's jobs hold: one job at a time works on a
message for a destination (common/leasebook.py). A job takes its leases with ``Leases.taken`` and
they end when its block ends, on every path (those of messages its outcomes removed too: they are
fields of the destination's hash, ended in one call). While held they are pushed on by the worker's
heartbeat (``renew``: one PEXPIRE a job), so a dead worker's leases lapse within ``ttl``."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from common.leasebook import LeaseBook

__all__ = ["Lease", "Leases"]


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
        block put in ``lease.done`` if it ended without an error (in one round trip)."""
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
            done = () if failed else lease.done
            if got or done:
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
