"""The (message, destination) leases this process's jobs hold: one job at a time works on a
message for a destination (common/store.py ``Store.lease``). A job takes its leases with
``Leases.taken`` and they end when its block ends, on every path, except those its finishing
already ended in the same transaction as the delete (``Lease.ended``). While held they are pushed
on by the worker's heartbeat (``renew``), so a dead worker's leases lapse within ``ttl``."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
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


class Leases:
    def __init__(self, store: Store, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._lock = threading.Lock()
        self._held: dict[str, Lease] = {}  # token -> lease

    @contextmanager
    def taken(self, qids: Sequence[str], destination: str) -> Iterator[Lease]:
        """Take the leases of ``qids`` for ``destination``; the block sees which it got. They are
        renewed by the heartbeat while the block runs and ended when it ends."""
        token = uuid.uuid4().hex
        got = self.store.lease(list(qids), destination, token, self.ttl) if qids else []
        lease = Lease(destination, token, got)
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
        """Push on every lease held now (the worker's heartbeat): one round trip."""
        with self._lock:
            held = [(x.token, x.destination, list(x.taken)) for x in self._held.values()]
        if held:
            self.store.renew_leases(held, self.ttl)

    def in_flight(self) -> int:
        """Messages leased by this process's jobs now."""
        with self._lock:
            return sum(len(x.taken) for x in self._held.values())
