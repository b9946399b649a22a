"""This process's conversations: how many run (``worker_concurrency`` permits), on which lanes,
with which connections. A job's parcels wait in their destination's lane (worker/lane.py) and
``Crew.tend`` starts conversations for it, each in a thread of its own (docs/architecture.md,
"Many conversations per worker", says why threads), while the lane has more parcels than
conversations and the destination's window has slots (worker/limits.py).

What a conversation holds is a ``Seat``: a permit, a connection slot and maybe a cached connection.
The seat is let go of when the conversation's ``with`` block ends, on every path; a connection
that may serve the next job goes to the connection cache and takes its slot with it
(``Slot.keep``), which the cache frees when it drops the connection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import redis

from worker.lane import Lane, Lanes, Owner
from worker.limits import DestinationLimits, Slot, free_slots
from worker.parcel import Parcel
from worker.relay import Dialer, Opened, converse
from worker.smtpclient import ConnectionCache

__all__ = ["SLOT_WAIT", "STAFF_PAUSE", "Crew", "Permit", "Permits", "Seat"]

log = logging.getLogger("mtaq.worker")

SLOT_WAIT = 5.0  # seconds a job waits for a connection slot before handing its parcels back
STAFF_PAUSE = 0.2  # after a full window, seconds before a lane asks for a slot again
LOOK_EVERY = 0.2  # seconds between a waiting job's looks at its lane
# seconds between a conversation's looks at whether another process waits for a slot: a look is
# local but for one Redis read a process shares (worker/limits.py WANTS_LOOK). At 1 s a second
# worker that started while the first held the window waited 1-2 s for its first slot, and the
# messages its jobs had drawn were that late (smtp-source, 2 workers: p99 2.2-7.1 s in about one
# run of six)
WANT_LOOK = 0.25
STARVING_FOR = 1.0  # seconds a lane's mark as waiting for a permit lasts (it looks every LOOK_EVERY)


class Permit:
    """One of the process's conversation permits, given back exactly once (``with permit:`` or
    ``free()``); ``keep()`` hands it on as a new Permit, as ``Slot.keep`` does."""

    __slots__ = ("_owned", "_permits")

    def __init__(self, permits: Permits) -> None:
        self._permits = permits
        self._owned = True

    def keep(self) -> Permit:
        if not self._owned:
            raise RuntimeError("permit already given back or handed on")
        self._owned = False
        return Permit(self._permits)

    def free(self) -> None:
        if self._owned:
            self._owned = False
            self._permits._give_back()

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()


class Permits:
    """How many of something run at once: this process's conversations (``worker_concurrency``),
    and the RQ worker's jobs (worker/pool.py)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._cond = threading.Condition()
        self._in_use = 0  # the one count: what is taken, what is free and who waits all read it

    def take(self, timeout: float = 0.0) -> Permit | None:
        """A permit, or None when every one is still in use after ``timeout`` seconds (0: at once)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._in_use < self.capacity, timeout if timeout > 0 else 0):
                return None
            self._in_use += 1
        return Permit(self)

    def take_many(self, n: int) -> list[Permit]:
        """Up to ``n`` permits, as many as are free now."""
        with self._cond:
            got = max(0, min(n, self.capacity - self._in_use))
            self._in_use += got
        return [Permit(self) for _ in range(got)]

    def free(self) -> int:
        """How many are not in use now."""
        with self._cond:
            return self.capacity - self._in_use

    def _give_back(self) -> None:
        """Permit.free(): once per permit (the Permit sees to that)."""
        with self._cond:
            self._in_use -= 1
            self._cond.notify()


@dataclass(slots=True)
class Seat:
    """What one conversation holds; let go of when its ``with`` block ends."""

    permit: Permit
    slot: Slot
    opened: Opened | None  # a cached connection to start with, else None: the conversation dials

    def __enter__(self) -> Seat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.slot.free()  # nothing when the connection went to the cache with it
        self.permit.free()


class JobOwner(Owner, Protocol):
    """What ``tend`` needs of the job besides being the lane's owner of its parcels."""

    def wait(self, timeout: float) -> bool: ...

    def withdrawn(self, parcels: list[Parcel]) -> list[Parcel]: ...


class Crew:
    def __init__(
        self,
        dialer: Dialer,
        limits: DestinationLimits,
        lanes: Lanes,
        capacity: int,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        cache_time: float = 1.0,
        hold: Callable[[], None] = lambda: None,
    ) -> None:
        self.dialer = dialer
        self.hold = hold  # before each transaction: waits while outcomes cannot be recorded
        self.limits = limits
        self.lanes = lanes
        self.permits = Permits(capacity)
        # an idle connection keeps its slot; another process waiting for one of its destination's
        # slots gets it at once instead of after cache_time (bench.slowdest: a process whose share
        # of a destination's mail was done kept 10 of its 20 slots idle for a second, then the
        # other took them one STAFF_PAUSE at a time)
        self.cache = ConnectionCache(cache_time, on_drop=_free_slots, release=limits.wanted_elsewhere)
        self.sleep = sleep
        self.monotonic = monotonic
        self.stopping = threading.Event()
        # lanes with mail and no conversation that found every permit in use: the next permit freed
        # is theirs, not a busy lane's (bench.slowdest: a worker held 35 messages of a destination
        # with no conversation on it for over a second while its other lanes took each permit freed)
        # (marked each time the lane looks and finds none; a mark older than STARVING_FOR is
        # forgotten: the lane got one, or its job is gone)
        self._starving: dict[str, float] = {}
        self._starving_lock = threading.Lock()

    def tend(self, destination: str, lane: Lane, owner: JobOwner, parcels: list[Parcel]) -> list[Parcel]:
        """Until the job's parcels are done: start conversations while the lane has more parcels
        than conversations (and slots and permits allow). Returns the parcels handed back: when
        stopping, or when no conversation could be had for SLOT_WAIT seconds."""
        no_slot_since: float | None = None
        handed: list[Parcel] = []
        while not owner.wait(LOOK_EVERY):
            if handed:
                continue  # what a conversation had taken finishes its transaction
            if self.stopping.is_set():
                handed = owner.withdrawn(lane.withdraw(parcels))
                continue
            started = self._staff(destination, lane)
            if started or lane.conversations > 0:
                no_slot_since = None
                continue
            now = self.monotonic()
            if no_slot_since is None:
                no_slot_since = now
            elif now - no_slot_since > SLOT_WAIT:
                handed = owner.withdrawn(lane.withdraw(parcels))
        return handed

    def _staff(self, destination: str, lane: Lane) -> bool:
        """Start conversations while the lane has more parcels waiting than conversations will
        take soon; the slots they need are asked for together, one round trip for all of them.
        False at once while another thread does it for the lane (``Lane.staffing``)."""
        with lane.staffing() as mine:
            return mine and self._staff_now(destination, lane)

    def _staff_now(self, destination: str, lane: Lane) -> bool:
        started = False
        while not self.stopping.is_set():
            # no more than the destination could ever allow: permits taken for nothing are
            # missed by the other lanes until the round trip is over
            wanted = min(lane.shortfall(self.monotonic()), self.limits.concurrency)
            if wanted and lane.conversations and self._others_starve(destination):
                break  # a lane with none goes first
            permits = self.permits.take_many(wanted)
            with self._starving_lock:
                if wanted and not permits and not lane.conversations:
                    self._starving[destination] = self.monotonic()
                else:
                    self._starving.pop(destination, None)
            if not permits:
                break
            try:
                connections = self._connections(destination, lane, len(permits))
            except BaseException:
                for permit in permits:
                    permit.free()
                raise
            for permit in permits[len(connections) :]:
                permit.free()
            used = permits[: len(connections)]
            seats = [Seat(p, slot, got) for p, (got, slot) in zip(used, connections, strict=True)]
            self._start(destination, lane, seats)
            started = started or bool(connections)
            if len(connections) < len(permits):
                lane.pause(self.monotonic() + STAFF_PAUSE)
                break
        return started

    def _others_starve(self, destination: str) -> bool:
        """Whether another lane waits for a permit with no conversation (marked recently)."""
        with self._starving_lock:
            if not self._starving:
                return False
            since = self.monotonic() - STARVING_FOR
            self._starving = {d: t for d, t in self._starving.items() if t >= since}
            return any(d != destination for d in self._starving)

    def _start(self, destination: str, lane: Lane, seats: list[Seat]) -> None:
        """A thread for each seat's conversation; a seat that gets none is let go of."""
        for n, seat in enumerate(seats):
            lane.started()
            try:
                threading.Thread(
                    target=self._converse,
                    args=(destination, lane, seat),
                    name=f"mtaq-smtp-{destination}",
                    daemon=True,
                ).start()
            except BaseException:
                with seat:
                    self.lanes.ended(destination, lane)
                    _hang_up(seat.opened)
                for rest in seats[n + 1 :]:
                    with rest:
                        _hang_up(rest.opened)
                raise

    def _connections(self, destination: str, lane: Lane, n: int) -> list[tuple[Opened | None, Slot]]:
        """Up to ``n``: cached idle connections (each holds its slot) to the lane's addresses first,
        then slots for new connections, as many as the destination's window has free."""
        out: list[tuple[Opened | None, Slot]] = []
        try:
            while len(out) < n and (cached := self._cached(destination, lane)) is not None:
                out.append(cached)
            if len(out) < n:
                out += [(None, slot) for slot in self.limits.acquire_many(destination, n - len(out))]
        except BaseException:
            for opened, slot in out:
                with slot:
                    _hang_up(opened)
            raise
        return out

    def _cached(self, destination: str, lane: Lane) -> tuple[Opened, Slot] | None:
        """A cached idle connection to one of the lane's addresses (others are closed), or None."""
        while True:
            cached = self.cache.take(destination)
            if cached is None:
                return None
            conn, extra = cached
            assert isinstance(extra, tuple)
            slot, to, sent = extra
            # to which of the lane's addresses (equal MX preferences are shuffled)
            where = [n for n, t in enumerate(lane.targets) if (t.ip, t.port) == (to.ip, to.port)]
            if where:
                return Opened(conn, where[0], sent, to), slot
            with slot:
                conn.quit()

    def _converse(self, destination: str, lane: Lane, seat: Seat) -> None:
        reached = False
        yielded = False
        look_at = self.monotonic() + WANT_LOOK

        def stop_here() -> bool:
            """Between transactions: stopping, or (looked at every WANT_LOOK seconds) giving the
            slot up to another process's waiting jobs (worker/limits.py should_yield)."""
            nonlocal yielded, look_at
            if self.stopping.is_set():
                return True
            now = self.monotonic()
            if not yielded and now >= look_at:
                look_at = now + WANT_LOOK
                yielded = self.limits.should_yield(destination)
            return yielded

        try:
            with seat:
                result: Opened | None = None
                try:
                    result, reached = converse(
                        lane,
                        self.dialer,
                        opened=seat.opened,
                        stopping=stop_here,
                        pace=lambda: self._pace(destination),
                        feedback=lambda ok, why: self._feedback(destination, lane, ok, why),
                    )
                except Exception:
                    log.exception("%s: conversation failed", destination)
                if result is not None:
                    if result.to is not None and result.conn.alive and not self.stopping.is_set() and not yielded:
                        self.cache.give(destination, result.conn, (seat.slot.keep(), result.to, result.sent))
                    else:
                        result.conn.quit()
        finally:
            alone = self.lanes.ended(destination, lane)
        if alone and not reached and not self.stopping.is_set():
            # every address failed and no other conversation runs: what waits gets the last
            # failure now, rather than the next conversation failing the same way
            lane.left()

    def _pace(self, destination: str) -> None:
        self.hold()
        wait = self.limits.pace(destination)
        if wait > 0:
            self.sleep(wait)

    def _feedback(self, destination: str, lane: Lane, ok: bool, why: str) -> None:
        try:
            if ok and not self.limits.limited(destination):
                # the window has not held this process back lately: growing it now starts nothing,
                # so the news rides the next outcome write (DestinationLimits.news)
                self.limits.news(destination)
            elif ok:
                if self.limits.succeeded(destination):
                    # the window grew: parcels waiting need not wait for their job's next look
                    # (LOOK_EVERY, after a STAFF_PAUSE), which made slow start take 0.2 s a step
                    lane.grew()
                    self._staff(destination, lane)
            else:
                self.limits.failed(destination, why)
        except redis.RedisError:
            log.warning("%s: could not record the connection outcome (Redis unavailable)", destination)
        except Exception:  # starting a conversation failed: this one goes on, the job looks again
            log.exception("%s: could not start another conversation", destination)

    def grew(self, destination: str) -> None:
        """The destination's window grew with successes' news that rode another write
        (DestinationLimits.ride: the outcome writer's, a job's, the heartbeat's): its lane asks at
        its next look, without the pause a refusal left (conversations are started by the job's
        look, not on the thread that wrote)."""
        lane = self.lanes.get(destination)
        if lane is not None:
            lane.grew()

    def heartbeat(self) -> None:
        """Push on the slots this process holds; close idle connections past their time."""
        self.limits.heartbeat(self.grew)
        self.cache.sweep()

    def stop(self) -> None:
        """Conversations end after their transaction; idle connections close."""
        self.stopping.set()
        self.cache.sweep(everything=True)
        self.limits.close()


def _hang_up(opened: Opened | None) -> None:
    """Close a cached connection a conversation will not have after all."""
    if opened is not None:
        opened.conn.quit()


def _free_slots(extras: Sequence[object]) -> None:
    """The connection cache dropped idle connections: their slots go with them (one call a
    destination for a sweep's)."""
    free_slots([e[0] for e in extras if isinstance(e, tuple) and e and isinstance(e[0], Slot)])
