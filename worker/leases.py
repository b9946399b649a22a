"""The (message, destination) leases this process's jobs hold: one job at a time works on a
message for a destination (common/store.py ``Store.lease``). A job takes its leases with
``Leases.taken`` and they end when its block ends, on every path, except those its finishing
already ended in the same transaction as the delete (``Lease.ended``). While held they are pushed
on by the worker's heartbeat (``renew``), so a dead worker's leases lapse within ``ttl``."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from common.store import Store

__all__ = ["Lease", "Leases"]


@dataclass(slots=True)
class Lease:
    """One job's leases on its messages for one destination."""

    destination: str
    token: str
    taken: list[str]  # the messages whose lease the job got (the others another job holds)
    ended: set[str] = field(default_factory=set)  # ended already (the messages deleted with them)
    renewed: float = 0.0  # when the leases were taken or last pushed on (the Leases' clock)


class Leases:
    def __init__(self, store: Store, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, Lease] = {}  # token -> lease

    @contextmanager
    def taken(self, qids: Sequence[str], destination: str) -> Iterator[Lease]:
        """Take the leases of ``qids`` for ``destination``; the block sees which it got. They are
        renewed by the heartbeat while the block runs and ended when it ends."""
        token = uuid.uuid4().hex
        got = self.store.lease(list(qids), destination, token, self.ttl) if qids else []
        lease = Lease(destination, token, got, renewed=self.clock())
        if got:
            with self._lock:
                self._held[token] = lease
        try:
            yield lease
        finally:
            with self._lock:
                self._held.pop(token, None)
            rest = [q for q in got if q not in lease.ended]
            if rest:
                self.store.end_leases(rest, destination, token)

    def renew(self) -> None:
        """Push on the leases held now that are a quarter of their TTL old (the worker's heartbeat,
        every ttl/4 seconds, calls this): one round trip. A lease lapses ``ttl`` after its holder
        died whenever it was last pushed on; one pushed on at every heartbeat would cost two
        writes a message every few seconds, and most jobs end before their leases are that old.
        (A third, with the 20 s TTL that matches the RQ execution's, left a live job's lease 8 s
        from lapsing between two beats; a quarter leaves 10.)"""
        now = self.clock()
        with self._lock:
            due = [x for x in self._held.values() if now - x.renewed >= self.ttl / 4]
            held = [(x.token, x.destination, list(x.taken)) for x in due]
        if held:
            self.store.renew_leases(held, self.ttl)
            with self._lock:
                for x in due:
                    x.renewed = now

    def in_flight(self) -> int:
        """Messages leased by this process's jobs now."""
        with self._lock:
            return sum(len(x.taken) for x in self._held.values())
