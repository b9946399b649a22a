"""worker/crew.py: permits and seats are given back exactly once, on every path; a connection
kept for the next job takes its slot to the cache, which frees it when it drops the connection."""

from __future__ import annotations

import time
from typing import Any

import fakeredis
import pytest

from tests.unit.fakeclock import FakeClock
from tests.unit.fakepeer import FakeConnection, FakePeer
from worker.crew import Crew, Permits, Seat, _free_slots
from worker.limits import DestinationLimits, Slot
from worker.smtpclient import ConnectionCache


def test_a_permit_is_given_back_once_and_a_kept_one_by_its_new_holder() -> None:
    permits = Permits(1)
    p = permits.take()
    assert p is not None and permits.take() is None
    with p:
        kept = p.keep()
    assert permits.take() is None  # handed on, not given back
    kept.free()
    kept.free()  # once only: a second give-back would count a permit still held as free
    again = permits.take()
    assert again is not None and permits.take() is None
    again.free()
    with pytest.raises(RuntimeError):
        again.keep()


def test_a_seat_lets_go_of_its_permit_and_slot_when_its_block_fails() -> None:
    r = fakeredis.FakeRedis()
    limits = DestinationLimits(r, clock=FakeClock(time.time()))
    permits = Permits(1)
    permit, slot = permits.take(), limits.acquire("y.test")
    assert permit is not None and slot is not None
    with pytest.raises(ZeroDivisionError), Seat(permit, slot, None):
        1 / 0  # noqa: B018
    assert limits.held() == 0 and r.zcard("mtaq:dest:y.test:slots") == 0
    assert permits.take() is not None


def test_a_cached_connection_holds_its_slot_until_the_cache_drops_it() -> None:
    r = fakeredis.FakeRedis()
    limits = DestinationLimits(r, clock=FakeClock(time.time()))
    cache = ConnectionCache(on_drop=_free_slots)
    permit, slot = Permits(1).take(), limits.acquire("y.test")
    assert permit is not None and slot is not None
    with Seat(permit, slot, None) as seat:
        cache.give("y.test", FakeConnection(FakePeer(), "192.0.2.1"), (seat.slot.keep(), None, 1))
    assert limits.held() == 1  # the idle connection is still a connection
    cache.sweep(everything=True)
    assert limits.held() == 0 and r.zcard("mtaq:dest:y.test:slots") == 0


def test_a_sweep_gives_a_destinations_slots_back_in_one_call_and_each_once() -> None:
    r = fakeredis.FakeRedis()
    limits = DestinationLimits(r, clock=FakeClock(time.time()))
    calls: list[list[Any]] = []
    release = limits._release

    def counted(keys: list[str], args: list[Any]) -> Any:
        calls.append(list(args))
        return release(keys=keys, args=args)

    limits._release = counted  # type: ignore[assignment]
    cache = ConnectionCache(on_drop=_free_slots)
    slots = limits.acquire_many("y.test", 3) + limits.acquire_many("z.test", 1)
    assert len(slots) == 4 and limits.held() == 4
    for slot in slots:
        cache.give(slot.destination, FakeConnection(FakePeer(), "192.0.2.1"), (slot.keep(), None, 1))
    cache.sweep(everything=True)
    assert limits.held() == 0 and r.zcard("mtaq:dest:y.test:slots") == 0 and r.zcard("mtaq:dest:z.test:slots") == 0
    assert sorted(len(c) for c in calls) == [1, 3]  # one call a destination
    _free_slots([(slots[0], None, 1)])  # already handed on and freed: nothing again
    assert len(calls) == 2


def test_an_idle_connection_lets_its_slot_go_after_the_idle_limit_by_itself() -> None:
    """Nobody takes from the cache or beats a heartbeat: the connection still goes when its idle
    time is up, and its slot with it (another process's job may be waiting for that slot)."""
    r = fakeredis.FakeRedis()
    limits = DestinationLimits(r, clock=FakeClock(time.time()))
    cache = ConnectionCache(0.05, on_drop=_free_slots)
    slot = limits.acquire("y.test")
    assert slot is not None
    conn = FakeConnection(FakePeer(), "192.0.2.1")
    cache.give("y.test", conn, (slot.keep(), None, 1))
    assert limits.held() == 1
    deadline = time.monotonic() + 5.0
    while limits.held() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert limits.held() == 0 and len(cache) == 0 and r.zcard("mtaq:dest:y.test:slots") == 0


def test_a_sweep_of_everything_returns_only_once_the_sweeper_has_dropped_what_it_took() -> None:
    """The sweeper thread has taken an idle connection out and is still saying QUIT when the
    process sweeps everything (stopping): the sweep waits, so every slot is free when it returns."""
    import threading

    class SlowQuit(FakeConnection):
        def quit(self) -> None:
            quitting.set()
            time.sleep(0.3)
            super().quit()

    quitting = threading.Event()
    r = fakeredis.FakeRedis()
    limits = DestinationLimits(r, clock=FakeClock(time.time()))
    cache = ConnectionCache(0.01, on_drop=_free_slots)
    slot = limits.acquire("y.test")
    assert slot is not None
    cache.give("y.test", SlowQuit(FakePeer(), "192.0.2.1"), (slot.keep(), None, 1))
    assert quitting.wait(5.0)  # the sweeper has it
    assert len(cache) == 0 and limits.held() == 1
    cache.sweep(everything=True)
    assert limits.held() == 0 and r.zcard("mtaq:dest:y.test:slots") == 0


def test_an_idle_connection_gives_its_slot_up_soon_when_another_process_wants_one() -> None:
    """Within ``look_every`` instead of the idle limit: a process whose mail for a destination is
    done does not keep slots another process's conversations wait for."""
    r = fakeredis.FakeRedis()
    clock = FakeClock(time.time())
    holder = DestinationLimits(r, concurrency=1, clock=clock)
    other = DestinationLimits(r, concurrency=1, clock=clock)
    cache = ConnectionCache(60.0, on_drop=_free_slots, release=holder.wanted_elsewhere, look_every=0.05)
    slot = holder.acquire("y.test")
    assert slot is not None
    cache.give("y.test", FakeConnection(FakePeer(), "192.0.2.1"), (slot.keep(), None, 1))
    time.sleep(0.2)
    assert holder.held() == 1, "nobody wants it: it stays for the idle limit"
    assert other.acquire("y.test") is None  # a claim
    clock.now += 1.0  # the holder's next look at the claims sees it
    deadline = time.monotonic() + 5.0
    got = None
    while got is None and time.monotonic() < deadline:
        time.sleep(0.05)
        got = other.acquire("y.test")  # the waiting process asks again (its claim lapses in real time)
    assert holder.held() == 0 and len(cache) == 0
    assert got is not None


def test_a_lane_with_mail_and_no_conversation_gets_the_next_free_permit_before_a_busy_one() -> None:
    """Every permit in use: the lane that has none marks itself, and a lane that already has
    conversations leaves the next freed permit to it."""
    from common.envelope import Envelope, Recipient
    from tests.unit.fakepeer import FakeDialer, target
    from worker.lane import Lane, Lanes
    from worker.parcel import Parcel

    class Keep:
        def record(self, parcel: Parcel, positions: list[int]) -> None: ...

        def done(self, parcel: Parcel) -> None: ...

    def parcels(n: int) -> list[Parcel]:
        return [
            Parcel(Envelope(id=f"Q{i}", sender="a@x.test", recipients=[Recipient("u@y.test")]), b"x", [0])
            for i in range(n)
        ]

    r = fakeredis.FakeRedis()
    clock = FakeClock(time.time())
    crew = Crew(FakeDialer(FakePeer()), DestinationLimits(r, clock=clock), Lanes(), 1, monotonic=clock)
    busy, starved = Lane([target()]), Lane([target()])
    busy.add(parcels(3), Keep())
    starved.add(parcels(3), Keep())
    busy.started()  # a conversation runs on it: it holds the one permit
    held = crew.permits.take()
    assert held is not None
    assert not crew._staff("starved.test", starved)  # no permit: marked
    held.free()
    assert not crew._staff("busy.test", busy) and crew.permits.free() == 1, "left to the starved lane"
    clock.now += 2.0  # the mark lapses when nobody renews it (the lane got one, or its job ended)
    assert crew._others_starve("busy.test") is False


def test_two_threads_staffing_one_lane_start_one_conversation_for_one_parcel() -> None:
    """Each reads the shortfall before its round trip for slots: without the lane's staffing lock,
    five threads (a job's look, conversations whose greetings grew the window) started five."""
    import threading

    from common.envelope import Envelope, Recipient
    from tests.unit.fakepeer import FakeDialer, target
    from worker.lane import Lane, Lanes
    from worker.parcel import Parcel

    class Keep:
        def record(self, parcel: Parcel, positions: list[int]) -> None: ...

        def done(self, parcel: Parcel) -> None: ...

    r = fakeredis.FakeRedis()
    limits = DestinationLimits(r, clock=time.time)
    real = limits.acquire_many

    def slow(destination: str, n: int) -> list[Slot]:
        time.sleep(0.05)  # the round trip, long enough for the others to read the same shortfall
        return real(destination, n)

    limits.acquire_many = slow  # type: ignore[method-assign]
    crew = Crew(FakeDialer(FakePeer()), limits, Lanes(), 50)
    one = Lane([target()])
    envs = [Envelope(id=f"Q{i}", sender="a@x.test", recipients=[Recipient("u@y.test")]) for i in range(6)]
    one.add([Parcel(e, b"x", [0]) for e in envs], Keep())
    for _ in range(5):
        one.started()
    assert one.shortfall(time.monotonic()) == 1
    begun: list[Seat] = []

    def start(destination: str, lane: Lane, seats: list[Seat]) -> None:
        for seat in seats:
            lane.started()
            begun.append(seat)

    crew._start = start  # type: ignore[method-assign]
    threads = [threading.Thread(target=crew._staff, args=("y.test", one)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(begun) == 1 and limits.held() == 1


def test_each_transaction_first_waits_for_the_hold_the_service_gives_its_crew() -> None:
    """The hold (worker/outcomes.py OutcomeWriter.hold: a stalled outcome write) comes before the
    destination's pacing, before every transaction; the service gives its crew its writer's."""
    from tests.unit.fakepeer import FakeDialer, service_on
    from worker.lane import Lanes

    calls: list[str] = []
    r = fakeredis.FakeRedis()
    limits = DestinationLimits(r, clock=FakeClock(time.time()))
    real = limits.pace

    def pace(destination: str) -> float:
        calls.append("pace")
        return real(destination)

    limits.pace = pace  # type: ignore[method-assign]
    crew = Crew(FakeDialer(FakePeer()), limits, Lanes(), 1, hold=lambda: calls.append("hold"))
    crew._pace("y.test")
    assert calls == ["hold", "pace"]
    svc = service_on(r, FakePeer(), FakeClock(time.time()))
    try:
        assert svc.crew.hold == svc.writer.hold
    finally:
        svc.stop()


def test_a_success_is_sent_at_once_only_where_the_window_holds_the_process_back() -> None:
    """worker/crew.py ``_feedback``: a success for a destination whose window refused this process
    a slot lately is sent at once (the window grows now, the lane may start another conversation);
    elsewhere its news waits for the next write (DestinationLimits.news), and a window that grew
    with it is told to its lane (``grew``)."""
    from tests.unit.fakepeer import FakeDialer
    from worker.lane import Lane, Lanes
    from worker.limits import INITIAL_WINDOW

    r = fakeredis.FakeRedis()
    clock = FakeClock(time.time())
    limits = DestinationLimits(r, clock=clock)
    lanes = Lanes()
    crew = Crew(FakeDialer(FakePeer()), limits, lanes, 1, monotonic=clock)
    lane = Lane([])
    crew._feedback("free.test", lane, True, "")
    assert limits.window("free.test") == INITIAL_WINDOW and limits._due == {"free.test": 1}, "waits"
    limits.acquire_many("held.test", INITIAL_WINDOW + 1)  # refused one: held back from now on
    crew._feedback("held.test", lane, True, "")
    assert limits.window("held.test") == INITIAL_WINDOW + 1 and "held.test" not in limits._due, "at once"
    with lanes.joined("free.test", []) as joined:
        joined.pause(clock() + 60.0)
        crew.heartbeat()  # no write went: the heartbeat takes the news
        assert limits.window("free.test") == INITIAL_WINDOW + 1
        assert joined._pause_until == 0.0, "the lane was told its window grew"
