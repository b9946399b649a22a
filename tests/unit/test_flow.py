"""Mail input flow control (ingress/flow.py): the pure decision on a sample, and the gate that
holds a MAIL, both on an injected clock and sleep (no timing guesses)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import fakeredis
import pytest

from common.jobqueue import DeliveryQueue
from ingress.flow import QUIET, STALE_AFTER, Backlog, FlowGate, lagging, read_backlog
from tests.unit.fakeclock import FakeClock


# -- the decision ----------------------------------------------------------------------------------
def test_lagging_counts_ready_and_running_jobs_against_the_limit() -> None:
    now = 100.0
    assert not lagging(Backlog(0, 0, now), now, 32)
    assert not lagging(Backlog(10, 21, now), now, 32)
    assert lagging(Backlog(10, 22, now), now, 32)
    assert lagging(Backlog(0, 40, now), now, 32)  # all held by workers: the backlog is theirs
    assert lagging(Backlog(40, 0, now), now, 32)  # no worker at all


def test_the_limit_is_in_messages_by_the_size_of_the_jobs_written() -> None:
    now = 100.0
    assert not lagging(Backlog(0, 31, now), now, 640, per_job=20.0)
    assert lagging(Backlog(0, 32, now), now, 640, per_job=20.0)
    assert not lagging(Backlog(0, 200, now), now, 640, per_job=2.0)  # ten slow destinations, small jobs
    clock, sleep = FakeClock(), FakeSleep()
    g = gate(clock, sleep, limit=640)
    for _ in range(50):
        g.wrote(20, 1)  # 20 sessions' messages to one next hop per group commit
    assert round(g.per_job) == 20
    g.observe(Backlog(0, 33, clock()))
    assert g.must_wait()
    g.wrote(0, 0)  # nothing written: nothing learnt
    assert round(g.per_job) == 20


def test_no_sample_or_a_stale_one_never_holds_mail() -> None:
    assert not lagging(None, 100.0, 1)
    sample = Backlog(500, 0, 100.0)
    assert lagging(sample, 100.0 + STALE_AFTER, 1)
    assert not lagging(sample, 100.0 + STALE_AFTER + 0.01, 1)


def test_read_backlog_is_rq_ready_list_and_the_jobs_workers_took() -> None:
    r = fakeredis.FakeRedis()
    r.rpush("rq:queue:mtaq", "a", "b", "c")
    # taken by a worker, not yet registered as started: a MAIL released in that moment let a test
    # see its 250 before any of the backlog was delivered
    r.rpush("rq:queue:mtaq:intermediate", "f")
    r.zadd("rq:wip:mtaq", {"d": 1.0, "e": 2.0})
    r.zadd("rq:scheduled:mtaq", {"retry": 1.0})  # retries wait their time: not counted
    queue = DeliveryQueue(r)
    assert (queue.ready_key, queue.taken_key, queue.running_key) == (
        "rq:queue:mtaq",
        "rq:queue:mtaq:intermediate",
        "rq:wip:mtaq",
    )
    assert read_backlog(r, queue.ready_key, queue.taken_key, queue.running_key, 7.0) == Backlog(3, 3, 7.0)
    # messages committed that no drain job has taken yet count one by one
    pipe = r.pipeline()
    queue.stage(pipe, {"a.test": [(f"q{i}", 10) for i in range(5)]})
    pipe.execute()
    keys = (queue.ready_key, queue.taken_key, queue.running_key)
    assert read_backlog(r, *keys, 7.0, queue.pending_key, queue.drawn_avg_key) == Backlog(4, 3, 7.0, pending=5)
    # a running drain job holds what drain jobs take, on average
    [job_id] = [j for j in queue.rq.get_job_ids() if j not in ("a", "b", "c")]
    assert queue.draw("a.test", job_id, 4) == ["q0", "q1", "q2", "q3"]
    read = read_backlog(r, *keys, 7.0, queue.pending_key, queue.drawn_avg_key)
    assert read == Backlog(5, 3, 7.0, pending=1, per_job=4.0)  # the rest: a job of its own


def test_messages_no_job_has_taken_count_against_the_limit() -> None:
    now = 100.0
    assert lagging(Backlog(0, 0, now, pending=32), now, 32)
    assert not lagging(Backlog(1, 0, now, pending=21), now, 32, per_job=10.0)
    assert lagging(Backlog(1, 0, now, pending=22), now, 32, per_job=10.0)
    assert lagging(Backlog(1, 0, now, pending=22, per_job=10.0), now, 32)  # the workers' own size
    assert not lagging(Backlog(1, 0, now, pending=22, per_job=1.0), now, 32, per_job=10.0)


# -- the gate --------------------------------------------------------------------------------------
class FakeSleep:
    """asyncio.sleep stand-in: each sleeper waits until the test calls ``wake()``."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self._wake = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        await self._wake.wait()

    def wake(self) -> None:
        self._wake.set()


def gate(clock: FakeClock, sleep: FakeSleep, *, delay: float = 1.0, limit: int = 4) -> FlowGate:
    return FlowGate(lambda taken: Backlog(0, 0, taken), delay=delay, limit=limit, clock=clock, sleep=sleep)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_no_backlog_costs_nothing() -> None:
    async def go() -> None:
        clock, sleep = FakeClock(), FakeSleep()
        g = gate(clock, sleep)
        g.observe(Backlog(1, 2, clock()))
        assert not g.must_wait()
        assert await g.wait() is True
        assert sleep.asked == [] and g.held_total == 0

    asyncio.run(go())


def test_held_mail_goes_as_soon_as_delivery_catches_up(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        clock, sleep = FakeClock(), FakeSleep()
        g = gate(clock, sleep)
        with caplog.at_level(logging.INFO, "mtaq.ingress"):
            g.observe(Backlog(3, 5, clock()))
            assert g.must_wait()
            held = [asyncio.ensure_future(g.wait()) for _ in range(3)]
            await settle()
            assert not any(h.done() for h in held)
            assert sleep.asked == [1.0, 1.0, 1.0]  # each at most in_flow_delay
            g.observe(Backlog(0, 3, clock()))  # below the limit: every held MAIL goes at once
            await settle()
            assert [h.result() for h in held] == [True, True, True]
            assert not g.must_wait()
            # the backlog hovers at the limit: one "on" line for the episode, not one per poll
            for _ in range(3):
                clock.now += 0.1
                g.observe(Backlog(0, 4, clock()))
                clock.now += 0.1
                g.observe(Backlog(0, 1, clock()))
            clock.now += QUIET
            g.observe(Backlog(0, 0, clock()))
            g.observe(Backlog(0, 0, clock()))
        lines = [r.getMessage() for r in caplog.records if "flow control" in r.getMessage()]
        assert len(lines) == 2, lines
        assert lines[0].startswith("mail input flow control on: 8 delivery jobs unfinished (5 held by workers")
        assert lines[1].startswith("mail input flow control off") and "3 MAIL(s) held" in lines[1]

    asyncio.run(go())


def test_with_no_worker_each_mail_waits_the_delay_then_goes_on() -> None:
    async def go() -> None:
        clock, sleep = FakeClock(), FakeSleep()
        g = gate(clock, sleep, delay=0.5)
        g.observe(Backlog(100, 0, clock()))  # nobody takes jobs: the backlog never falls
        held = asyncio.ensure_future(g.wait())
        await settle()
        assert not held.done() and sleep.asked == [0.5]
        sleep.wake()  # in_flow_delay passed
        await settle()
        assert held.result() is False and g.timed_out == 1
        assert g.must_wait()  # the next message waits too: slowed, never refused

    asyncio.run(go())


def test_zero_delay_turns_it_off_and_a_failed_read_opens_the_gate() -> None:
    async def go() -> None:
        clock, sleep = FakeClock(), FakeSleep()
        off = gate(clock, sleep, delay=0.0)
        off.observe(Backlog(1000, 1000, clock()))
        assert not off.must_wait()
        await off.watch()  # returns at once: no poller when off

        def broken(taken: float) -> Backlog:
            raise ConnectionError("redis down")

        g = FlowGate(broken, delay=1.0, limit=4, clock=clock, sleep=sleep)
        g.observe(Backlog(0, 9, clock()))
        assert g.must_wait()
        await g.step()  # the read fails: no word on the backlog is no reason to hold mail
        assert not g.must_wait() and g.sample is None

    asyncio.run(go())


class StepSleep:
    """asyncio.sleep stand-in: each sleep waits until the test releases that one (``release()``)."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self._naps: list[asyncio.Future[None]] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        nap: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._naps.append(nap)
        await nap

    def release(self, only: float | None = None) -> None:
        """Every pending sleep ends, or only those asked for ``only`` seconds."""
        for seconds, nap in zip(self.asked, self._naps, strict=True):
            if not nap.done() and (only is None or seconds == only):
                nap.set_result(None)


async def _until(check: Callable[[], bool]) -> None:
    """Let the poller's read (a thread) and its task run until ``check`` holds (2 s at most)."""
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the poller did not get there")


def test_the_poller_keeps_pace_while_mail_comes_and_idles_until_the_next_mail() -> None:
    from ingress.flow import ACTIVE_FOR, IDLE_INTERVAL

    async def go() -> None:
        clock, sleep = FakeClock(), StepSleep()
        reads: list[float] = []

        def read(taken: float) -> Backlog:
            reads.append(taken)
            return Backlog(0, 0, taken)

        g = FlowGate(read, delay=1.0, limit=4, interval=0.1, clock=clock, sleep=sleep)
        poller = asyncio.ensure_future(g.watch())
        await settle()
        await asyncio.sleep(0.01)  # the read runs in a thread
        assert len(reads) == 1 and sleep.asked == [IDLE_INTERVAL]  # no mail yet: idle
        g.must_wait()  # a MAIL wakes it: a read at once, before the idle nap ends
        await _until(lambda: len(reads) == 2)
        assert len(reads) == 2 and sleep.asked == [IDLE_INTERVAL, 0.1]  # then at its pace
        clock.now += ACTIVE_FOR  # no MAIL since: idle again after the next read
        sleep.release()
        await _until(lambda: len(sleep.asked) == 3)
        assert len(reads) == 3 and sleep.asked[-1] == IDLE_INTERVAL
        poller.cancel()
        sleep.release()
        await settle()

    asyncio.run(go())


def test_a_lag_that_goes_on_with_no_mail_coming_is_polled_once_a_second() -> None:
    from ingress.flow import ACTIVE_FOR, IDLE_INTERVAL

    async def go() -> None:
        clock, sleep = FakeClock(), StepSleep()
        reads: list[float] = []

        def read(taken: float) -> Backlog:
            reads.append(taken)
            return Backlog(10, 10, taken)  # lagging every time: the workers never catch up

        g = FlowGate(read, delay=1.0, limit=4, interval=0.1, clock=clock, sleep=sleep)
        poller = asyncio.ensure_future(g.watch())
        # no MAIL yet, the gate closed by the first sample: idle, at a pace that keeps it fresh
        await _until(lambda: sleep.asked == [STALE_AFTER / 2])
        g.must_wait()  # a MAIL: polled at pace
        await _until(lambda: sleep.asked == [STALE_AFTER / 2, 0.1])
        assert g.engaged
        # all mail taken, none held, the lag goes on: nobody reads the next sample
        clock.now += ACTIVE_FOR
        sleep.release(0.1)
        await _until(lambda: len(reads) == 3)
        await _until(lambda: len(sleep.asked) == 3)
        # once a second, not five times: the sample stays younger than STALE_AFTER for the next MAIL
        assert sleep.asked[-1] == STALE_AFTER / 2 < IDLE_INTERVAL and g.engaged
        assert g.must_wait()  # and that MAIL is held: the lag is still on
        await _until(lambda: len(reads) == 4)  # the MAIL woke it at once
        poller.cancel()
        sleep.release()
        await settle()

    asyncio.run(go())


def test_a_held_mail_keeps_the_poller_at_pace_past_active_for() -> None:
    from ingress.flow import ACTIVE_FOR

    async def go() -> None:
        clock, sleep = FakeClock(), StepSleep()
        lag = [True]

        def read(taken: float) -> Backlog:
            return Backlog(10, 10, taken) if lag[0] else Backlog(0, 0, taken)

        # a delay longer than ACTIVE_FOR: the MAIL is still held when its time at pace is over
        g = FlowGate(read, delay=3 * ACTIVE_FOR, limit=4, interval=0.1, clock=clock, sleep=sleep)
        poller = asyncio.ensure_future(g.watch())
        g.must_wait()
        await _until(lambda: 0.1 in sleep.asked)
        held = asyncio.ensure_future(g.wait())
        await _until(lambda: g.holding == 1)
        clock.now += ACTIVE_FOR
        paced = sleep.asked.count(0.1)
        sleep.release(0.1)
        await _until(lambda: sleep.asked.count(0.1) == paced + 1)  # still at pace for the held MAIL
        lag[0] = False
        sleep.release(0.1)
        await _until(lambda: held.done())
        assert held.result() is True and g.holding == 0
        poller.cancel()
        sleep.release()
        await settle()

    asyncio.run(go())
