"""worker/limits.py as the settings configure it (worker.jobs.make_service), on fakeredis with a
clock the test moves: destination_rate paces messages, destination_concurrency caps the slots,
destination_failure_limit / destination_retry_time mark a destination down, for every worker
sharing the Redis alike."""

from __future__ import annotations

import time

import fakeredis
import pytest

from common.settings import Settings
from common.spool import Spool
from tests.unit.fakeclock import FakeClock
from worker.jobs import make_service
from worker.limits import INITIAL_WINDOW, DestinationLimits


def limits(r: fakeredis.FakeRedis, clock: FakeClock, **settings: object) -> DestinationLimits:
    s = Settings(hostname="mtaq.test", dns_servers="127.0.0.1:53", **settings)  # type: ignore[arg-type]
    return make_service(s, Spool.from_settings(s, r), clock=clock).limits


def clock_now() -> FakeClock:
    """A clock moved by hand, starting at the real time: the limits set absolute expiries in Redis
    (PEXPIREAT), which Redis judges by its own clock."""
    return FakeClock(time.time())


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_destination_rate_reserves_one_moment_per_message_across_workers(r: fakeredis.FakeRedis) -> None:
    clock = clock_now()
    one, two = limits(r, clock, destination_rate=4.0), limits(r, clock, destination_rate=4.0)
    # four a second: each message reserves the next quarter second, whichever worker sends it
    # (Lua's tostring keeps 14 significant digits of an epoch time: a few microseconds off)
    assert [one.pace("a.test"), two.pace("a.test"), one.pace("a.test")] == pytest.approx([0, 0.25, 0.5], abs=1e-4)
    assert two.pace("b.test") == 0.0  # per destination
    clock.now += 10  # an idle destination starts again at once; no burst is saved up
    assert [two.pace("a.test"), one.pace("a.test")] == pytest.approx([0, 0.25], abs=1e-4)


def test_no_destination_rate_never_waits_and_writes_nothing(r: fakeredis.FakeRedis) -> None:
    lim = limits(r, clock_now())
    assert [lim.pace("a.test") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert r.keys("*rate*") == []


def test_destination_concurrency_caps_the_slots_of_every_worker_together(r: fakeredis.FakeRedis) -> None:
    clock = clock_now()
    one, two = limits(r, clock, destination_concurrency=3), limits(r, clock, destination_concurrency=3)
    slots = [one.acquire("a.test"), two.acquire("a.test"), one.acquire("a.test")]
    assert all(slots) and two.acquire("a.test") is None  # a window of min(3, INITIAL_WINDOW) = 3
    first = slots[0]
    assert first is not None
    first.free()
    assert two.acquire("a.test") is not None


def test_slow_start_grows_to_destination_concurrency_only(r: fakeredis.FakeRedis) -> None:
    lim = limits(r, clock_now(), destination_concurrency=INITIAL_WINDOW + 2)
    assert lim.window("a.test") == INITIAL_WINDOW
    for _ in range(10):
        lim.succeeded("a.test")
    assert lim.window("a.test") == INITIAL_WINDOW + 2


def test_failure_limit_and_retry_time_mark_the_destination_down(r: fakeredis.FakeRedis) -> None:
    lim = limits(r, clock_now(), destination_failure_limit=3, destination_retry_time=600)
    assert [lim.failed("a.test", "connection refused") for _ in range(3)] == [False, False, True]
    down = lim.down("a.test")
    assert down is not None and down.reason == "connection refused" and 599 <= down.seconds <= 600
    assert lim.down("b.test") is None
