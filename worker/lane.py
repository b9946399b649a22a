"""A destination's lane: the parcels this process's conversations with one destination take from,
fed by every job of the process that has messages for it (docs/architecture.md, "The job model").

``Lane`` owns all of a lane's state under one lock: the parcels waiting, whose job each belongs
to, how many conversations run on it and how many jobs use it, and when it may ask for another
conversation. ``Lanes`` owns the process's lanes by destination: a lane is made by the first job
that joins it and forgotten, in one place, once no job uses it and no conversation runs on it (the
next job resolves the destination afresh). Nothing here does IO.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from common.envelope import RcptState
from common.mx import Target
from worker.parcel import Outcome, Parcel
from worker.tlsgate import DestinationTLS

__all__ = ["Lane", "Lanes", "Owner"]

NO_HOST = Outcome(RcptState.DEFERRED, "4.4.1", "No reachable host", "none")
# A transaction that takes longer than this (a moving average of the lane's) holds its conversation
# for longer than a new connection takes to open (TCP, greeting, EHLO, STARTTLS over the internet):
# parcels waiting then want conversations of their own, not the next turn of a busy one
SLOW_TRANSACTION = 0.25


class Owner(Protocol):
    """The job a parcel belongs to: it records final outcomes and hears when a parcel is done."""

    def record(self, parcel: Parcel, positions: list[int]) -> None: ...

    def done(self, parcel: Parcel) -> None: ...


class Lane:
    """Parcels waiting for a conversation with one destination. A parcel carries a floor: the first
    target (MX address, in order) it may still be tried at; a conversation on target ``t`` takes
    parcels whose floor is at most ``t``. A parcel deferred at ``t`` comes back with floor ``t + 1``:
    the next MX gets its turn, as in Postfix."""

    def __init__(
        self,
        targets: Sequence[Target],
        tls: DestinationTLS | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.targets = list(targets)
        self.clock = clock
        self.tls = tls  # the TLS policies of the destination (MTA-STS, DANE); None: opportunistic
        self._lock = threading.Lock()
        self._queue: list[tuple[Parcel, int]] = []
        self._owners: dict[int, Owner] = {}
        self._conversations = 0  # running on this lane now
        self._in_hand: dict[int, float] = {}  # parcels conversations have taken (id -> when), until done
        self._transaction: float | None = None  # how long a parcel stays taken: a moving average
        self._users = 0  # jobs with parcels in it (Lanes counts them)
        self._pause_until = 0.0  # monotonic time before which no new conversation is asked for
        self._staffing = threading.Lock()  # held by the one thread starting conversations (``staffing``)
        self._last = NO_HOST

    # -- parcels -------------------------------------------------------------------------------------
    def add(self, parcels: Sequence[Parcel], owner: Owner) -> None:
        with self._lock:
            for p in parcels:
                if p.pending():
                    self._queue.append((p, 0))
                    self._owners[id(p)] = owner

    def take(self, t: int, relaxed: bool = False) -> Parcel | None:
        """The next parcel for target ``t`` (``relaxed``: only one with TLS-Required: No)."""
        with self._lock:
            for n, (parcel, floor) in enumerate(self._queue):
                if floor <= t and (not relaxed or parcel.relaxed):
                    del self._queue[n]
                    self._in_hand[id(parcel)] = self.clock()
                    return parcel
        return None

    def back(self, parcel: Parcel, floor: int) -> None:
        """A conversation gives back a parcel it took (for the next address)."""
        with self._lock:
            self._given(parcel)
            self._queue.append((parcel, floor))

    def has(self, t: int, relaxed: bool = False) -> bool:
        with self._lock:
            return any(floor <= t and (not relaxed or p.relaxed) for p, floor in self._queue)

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)

    def record(self, parcel: Parcel, positions: list[int]) -> None:
        with self._lock:
            owner = self._owners.get(id(parcel))
        if owner is not None:
            owner.record(parcel, positions)

    def finished(self, parcel: Parcel) -> None:
        """A conversation is done with this parcel it took (it is not coming back)."""
        with self._lock:
            self._given(parcel)
            owner = self._owners.pop(id(parcel), None)
        if owner is not None:
            owner.done(parcel)

    def withdraw(self, parcels: Sequence[Parcel]) -> list[Parcel]:
        """Take these parcels back out, those still waiting (their job hands them back)."""
        mine = {id(p) for p in parcels}
        with self._lock:
            out = [p for p, _ in self._queue if id(p) in mine]
            self._queue = [(p, f) for p, f in self._queue if id(p) not in mine]
            for p in out:
                self._owners.pop(id(p), None)
        return out

    def left(self) -> list[Parcel]:
        """Everything still waiting, taken out (no conversation will take it); owners hear."""
        with self._lock:
            out = [p for p, _ in self._queue]
            self._queue.clear()
            owners = [self._owners.pop(id(p), None) for p in out]
        for p, owner in zip(out, owners, strict=True):
            if owner is not None:
                owner.done(p)
        return out

    # -- what the last connection failure was ------------------------------------------------------
    def failed(self, outcome: Outcome) -> None:
        with self._lock:
            self._last = outcome

    @property
    def last(self) -> Outcome:
        """The last connection failure: what a recipient no conversation reached gets."""
        with self._lock:
            return self._last

    # -- conversations -------------------------------------------------------------------------------
    def _given(self, parcel: Parcel) -> None:
        """A conversation is done with a parcel it took (under the lock)."""
        taken = self._in_hand.pop(id(parcel), None)
        if taken is not None:
            took = self.clock() - taken
            self._transaction = (
                took if self._transaction is None else self._transaction + 0.2 * (took - self._transaction)
            )

    def shortfall(self, now: float) -> int:
        """How many more parcels wait than conversations will take soon; 0 while the lane pauses
        after a full window. Where transactions are slow (SLOW_TRANSACTION), a conversation in one
        is not counted on for the next parcel, only those starting or between two: with a server
        that takes a second to answer, one process's 12 conversations left 12 parcels waiting a
        second each while the other process's share of the destination's slots was free
        (bench.slowdest). Where they are quick, it is: a busy conversation takes the next parcel
        sooner than a new one could open, and asking for more then only made the processes sending
        to one destination take slots from each other (smtp-source: p99 330 -> 480 ms)."""
        with self._lock:
            if now < self._pause_until:
                return 0
            ready = self._conversations
            if self._transaction is not None and self._transaction >= SLOW_TRANSACTION:
                ready -= len(self._in_hand)
            return max(0, len(self._queue) - ready)

    def pause(self, until: float) -> None:
        """The destination's window was full: no new conversation is asked for before ``until``
        (the jobs waiting on a lane ask in turn, not all at once)."""
        with self._lock:
            self._pause_until = until

    @contextmanager
    def staffing(self) -> Iterator[bool]:
        """Whether this thread may start the lane's conversations now. One thread at a time: each
        reads the shortfall before its round trip for slots and counts what it starts only after,
        so two at once started a conversation each for one parcel (a job's look, and conversations
        whose greetings grew the window, worker/crew.py); the others leave it to that one."""
        got = self._staffing.acquire(blocking=False)
        try:
            yield got
        finally:
            if got:
                self._staffing.release()

    def grew(self) -> None:
        """The destination's window grew: the next look may ask at once."""
        with self._lock:
            self._pause_until = 0.0

    def started(self) -> None:
        with self._lock:
            self._conversations += 1

    def ended(self) -> bool:
        """A conversation ended: a connection (cached) or slot is free, so the next look may ask at
        once. True when it was the last one running."""
        with self._lock:
            self._conversations -= 1
            self._pause_until = 0.0
            return self._conversations == 0

    @property
    def conversations(self) -> int:
        with self._lock:
            return self._conversations

    def _join(self, delta: int) -> bool:
        """A job joins (+1) or leaves (-1); True when nothing uses the lane any more."""
        with self._lock:
            self._users += delta
            return self._unused()

    def _unused(self) -> bool:
        return self._users <= 0 and self._conversations == 0

    def unused(self) -> bool:
        with self._lock:
            return self._unused()


class Lanes:
    """This process's lanes by destination."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lanes: dict[str, Lane] = {}

    @contextmanager
    def joined(self, destination: str, targets: Sequence[Target], tls: DestinationTLS | None = None) -> Iterator[Lane]:
        """The destination's lane (made with ``targets`` and ``tls`` when there is none) while a
        job uses it."""
        with self._lock:
            lane = self._lanes.get(destination)
            if lane is None:
                lane = self._lanes[destination] = Lane(targets, tls)
            lane._join(+1)
        try:
            yield lane
        finally:
            with self._lock:
                if lane._join(-1):
                    self._forget(destination, lane)

    def ended(self, destination: str, lane: Lane) -> bool:
        """A conversation on ``lane`` ended (``Lane.ended``); the lane goes once unused."""
        with self._lock:
            alone = lane.ended()
            if lane.unused():
                self._forget(destination, lane)
            return alone

    def _forget(self, destination: str, lane: Lane) -> None:
        if self._lanes.get(destination) is lane:
            del self._lanes[destination]

    def get(self, destination: str) -> Lane | None:
        with self._lock:
            return self._lanes.get(destination)

    def __len__(self) -> int:
        with self._lock:
            return len(self._lanes)

    def waiting(self) -> int:
        """Parcels in every lane that no conversation has taken (worker/intake.py)."""
        with self._lock:
            lanes = list(self._lanes.values())
        return sum(len(lane) for lane in lanes)
