"""worker/limits.py on fakeredis with an injected clock: slots taken within the window and freed
exactly once, handed on with keep(), lapsing without a heartbeat; slow start; dead destinations;
the rate's schedule."""

from __future__ import annotations

import time

import fakeredis
import pytest

from common.store import dest_key
from tests.unit.fakeclock import FakeClock
from worker.limits import INITIAL_WINDOW, SLOT_TTL, DestinationLimits


@pytest.fixture
def clock() -> FakeClock:
    # about now: the slot sets' keys expire (PEXPIREAT) by Redis's own clock
    return FakeClock(time.time())


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def limits(r: fakeredis.FakeRedis, clock: FakeClock, **kw: float) -> DestinationLimits:
    return DestinationLimits(r, clock=clock, **kw)  # type: ignore[arg-type]


def slots(r: fakeredis.FakeRedis, dest: str = "y.test") -> int:
    return int(r.zcard(dest_key(dest, "slots")))


def test_the_window_starts_at_the_initial_concurrency(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = limits(r, clock, concurrency=20)
    got = [lim.acquire("y.test") for _ in range(INITIAL_WINDOW + 1)]
    assert all(got[:INITIAL_WINDOW]) and got[INITIAL_WINDOW] is None
    assert lim.held() == INITIAL_WINDOW == slots(r)


def test_a_slot_is_freed_once_on_every_path(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = limits(r, clock, concurrency=2)
    slot = lim.acquire("y.test")
    assert slot is not None
    with pytest.raises(ZeroDivisionError), slot:
        1 / 0  # noqa: B018
    assert slots(r) == 0 and lim.held() == 0
    other = lim.acquire("y.test")
    slot.free()  # a second free must not free someone else's slot
    assert other is not None and slots(r) == 1


def test_keep_hands_the_slot_on(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = limits(r, clock)
    slot = lim.acquire("y.test")
    assert slot is not None
    with slot:
        kept = slot.keep()  # to the connection cache
    assert slots(r) == 1 and lim.held() == 1
    with pytest.raises(RuntimeError):
        slot.keep()
    kept.free()
    assert slots(r) == 0


def test_a_slot_without_heartbeat_lapses(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = limits(r, clock, concurrency=1)
    assert lim.acquire("y.test") is not None
    clock.now += SLOT_TTL - 1
    assert lim.heartbeat() == 1  # pushed on: still ours after another SLOT_TTL - 1
    clock.now += SLOT_TTL - 1
    assert limits(r, clock, concurrency=1).acquire("y.test") is None
    clock.now += SLOT_TTL + 1  # the holder died: no heartbeat
    assert limits(r, clock, concurrency=1).acquire("y.test") is not None


def test_slow_start_grows_and_failures_shrink_then_mark_down(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = limits(r, clock, concurrency=7, failure_limit=3, retry_time=60.0)
    lim.succeeded("y.test")
    assert lim.window("y.test") == INITIAL_WINDOW + 1
    assert r.ttl("mtaq:dest:y.test:state") > 0  # the success that created the state gave it its TTL
    lim.succeeded("y.test")
    assert lim.window("y.test") == 7  # the limit
    assert not lim.failed("y.test", "refused") and lim.window("y.test") == 6
    assert not lim.failed("y.test", "refused")
    assert lim.down("y.test") is None
    assert lim.failed("y.test", "connect to mx: refused")
    down = lim.down("y.test")
    assert down is not None and down.reason == "connect to mx: refused" and 0 < down.seconds <= 60


def test_rate_spaces_the_messages(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = limits(r, clock, rate=2.0)
    # Lua turns the schedule into a 14-digit string: equal to a millisecond
    assert [lim.pace("y.test") for _ in range(3)] == pytest.approx([0.0, 0.5, 1.0], abs=1e-3)
    assert limits(r, clock).pace("y.test") == 0.0  # no rate set: never waits
