"""worker/outcomes.py on fakeredis: a batch's accounting of attempts, the outcome writer's group
commit (recorded, finished, errors raised by drain), a job's share of a lane."""

from __future__ import annotations

import threading
import time
from typing import Any

import fakeredis
import pytest
import redis

from common import metrics
from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.jobqueue import DeliveryQueue
from common.routing import Router
from common.spool import Spool
from common.statusscript import SET_STATUSES
from common.store import Message, Store
from tests.unit.fakeclock import FakeClock
from worker.limits import INITIAL_WINDOW, DestinationLimits
from worker.outcomes import (
    RETRY_LOG_EVERY,
    RETRY_PAUSE,
    STALL_FACTOR,
    STALL_WARN,
    WRITE_STALL,
    WRITE_STALL_REPLICATED,
    Batch,
    JobShare,
    OutcomeWriter,
    write_outcomes,
)
from worker.parcel import Outcome, Parcel

SENT = Outcome(RcptState.DELIVERED, "2.0.0", "250 2.0.0 Ok", "mx.test[192.0.2.1]:25", "mx.test")
SENT_STATUS = RecipientStatus(RcptState.DELIVERED, attempts=1, reply="250 2.0.0 Ok")
LATER = Outcome(RcptState.DEFERRED, "4.3.0", "host said: 451 4.3.0 busy", "mx.test[192.0.2.1]:25", "mx.test")


@pytest.fixture
def store() -> Store:
    r = fakeredis.FakeRedis()
    spool = Spool(Store(r), DeliveryQueue(r, "mtaq"), Router())
    spool.commit(
        [
            Message(
                Envelope(
                    id="Q1",
                    sender="a@x.test",
                    recipients=[Recipient("u@y.test"), Recipient("v@y.test")],
                    received_at=1000.0,
                ),
                b"x",
            )
        ]
    )
    return spool.store


def batch(store: Store, writer: OutcomeWriter, clock: FakeClock) -> tuple[Batch, Parcel]:
    loaded = {f.envelope.id: (f, st) for f, st in (x for x in store.load_many(["Q1"]) if x is not None)}
    msg = loaded["Q1"][0]
    return Batch(store, clock, writer, loaded, "y.test"), Parcel(msg.envelope, msg.body, [0, 1])


def test_an_attempt_deferred_past_the_lifetime_bounces_with_its_last_reply(store: Store) -> None:
    b, p = batch(store, OutcomeWriter(store), FakeClock(5000.0))
    p.outcomes[0] = LATER
    st = b.account_attempt(p, 0, 5000.0, None)
    assert st.state is RcptState.BOUNCED and st.attempts == 1
    assert st.reply == "host said: 451 4.3.0 busy (gave up after 4000s in queue)"
    again = b.account_attempt(p, 0, 5000.0, 300.0)
    assert again.state is RcptState.DEFERRED and again.next_attempt == 5300.0


def test_final_outcomes_are_written_by_the_writer_and_the_message_found_finished(store: Store) -> None:
    b, p = batch(store, OutcomeWriter(store), FakeClock(2000.0))
    p.outcomes = {0: SENT, 1: SENT}
    b.record_final(p, [0])
    b.record_final(p, [1])
    b.drain()
    assert set(b.recorded["Q1"]) == {0, 1} and b.finished == ["Q1"]
    found = store.load_many(["Q1"])[0]
    assert found is not None and all(s.state is RcptState.DELIVERED for s in found[1].values())


def test_the_deliveries_news_rides_the_outcome_write(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow start's news of a delivery (DestinationLimits.news) goes in the round trip that
    records it, not in one of its own; a window that grew is told to the crew (``grew``)."""
    clock = FakeClock(2000.0)
    limits = DestinationLimits(store.redis, concurrency=INITIAL_WINDOW + 3, clock=clock)
    store.redis.script_load(SET_STATUSES)  # test_news_rides_a_redis_that_forgot_the_scripts: when not
    grew: list[str] = []
    writes: list[int] = []
    write = store.set_status_list

    def counted(entries: Any, **kw: Any) -> list[int]:
        writes.append(len(entries))
        return write(entries, **kw)

    def alone(*a: object) -> str:
        raise AssertionError("news sent in a round trip of its own")

    monkeypatch.setattr(store, "set_status_list", counted)
    monkeypatch.setattr(limits, "_feed", alone)
    writer = OutcomeWriter(store, ride=lambda pipe: limits.ride(pipe, grew.append))
    b, p = batch(store, writer, clock)
    p.outcomes = {0: SENT, 1: SENT}
    limits.news("y.test")
    limits.news("y.test")
    b.record_final(p, [0, 1])
    b.drain()
    assert writes == [2]
    assert limits.window("y.test") == INITIAL_WINDOW + 2 and grew == ["y.test"]


def test_news_rides_a_redis_that_forgot_the_scripts(store: Store) -> None:
    """A Redis that restarted or failed over has no script cached: the outcomes are written (the
    writer's script loaded, and the write sent again, as before), and the news, sent by EVAL, ran
    in the first send (not again: the window grew once); its answer went with that send's error."""
    clock = FakeClock(2000.0)
    limits = DestinationLimits(store.redis, concurrency=INITIAL_WINDOW + 3, clock=clock)
    grew: list[str] = []
    store.redis.script_flush()
    limits.news("y.test")
    assert store.set_status_list([("Q1", 0, SENT_STATUS)], ride=lambda pipe: limits.ride(pipe, grew.append)) == [1]
    assert grew == [] and limits.window("y.test") == INITIAL_WINDOW + 1
    limits.news("y.test")
    store.set_status_list([("Q1", 1, SENT_STATUS)], ride=lambda pipe: limits.ride(pipe, grew.append))
    assert grew == ["y.test"] and limits.window("y.test") == INITIAL_WINDOW + 2


def test_news_that_fails_in_redis_fails_no_outcome_write(store: Store) -> None:
    """An error of the news's own (a key of another type here; an OOM under noeviction) is its
    script's -1, not an error reply: the outcomes it rode are written, and taken as written."""
    clock = FakeClock(2000.0)
    limits = DestinationLimits(store.redis, concurrency=INITIAL_WINDOW + 3, clock=clock)
    grew: list[str] = []
    store.redis.set("mtaq:dest:y.test:state", "not a hash")
    store.redis.script_load(SET_STATUSES)
    limits.news("y.test")
    assert store.set_status_list([("Q1", 0, SENT_STATUS)], ride=lambda pipe: limits.ride(pipe, grew.append)) == [1]
    assert grew == []


def test_a_write_that_fails_fails_the_job_at_drain(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(entries: object) -> list[int]:
        raise redis.ResponseError("ERR something")

    monkeypatch.setattr(store, "set_status_list", broken)
    b, p = batch(store, OutcomeWriter(store), FakeClock(2000.0))
    p.outcomes = {0: SENT}
    b.record_final(p, [0])
    with pytest.raises(redis.ResponseError):
        b.drain()


def test_a_job_share_waits_for_its_parcels(store: Store) -> None:
    b, p = batch(store, OutcomeWriter(store), FakeClock(2000.0))
    q = Parcel(p.envelope, p.body, [1])
    share = JobShare(b, [p, q])
    assert not share.wait(0.0)
    share.done(p)
    threading.Timer(0.05, share.done, (q,)).start()
    assert share.wait(5.0)
    assert JobShare(b, [p]).withdrawn([p]) == [p]


def test_a_write_that_stalls_holds_the_next_transactions_until_it_is_over(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stopped: conversations do not go on delivering what a killed worker would send again."""
    caplog.set_level("INFO", logger="mtaq.worker")
    caplog.set_level("INFO", logger="mtaq.delivery")
    stalls: list[str] = []
    monkeypatch.setattr(metrics.counters, "add", lambda key, n=1: stalls.append(key))
    now = [0.0]
    writer = OutcomeWriter(store, stall=0.5, monotonic=lambda: now[0])
    b, p = batch(store, writer, FakeClock(2000.0))
    release = threading.Event()
    entered = threading.Event()
    real = store.set_status_list

    def stuck(*a: object, **kw: object) -> list[int]:
        entered.set()
        release.wait(5)
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "set_status_list", stuck)
    p.outcomes[0] = SENT
    b.record_final(p, [0])  # the write begins and hangs
    assert entered.wait(5)
    p.outcomes[1] = SENT
    b.record_final(p, [1])  # the write has not taken ``stall`` yet: handed in, no wait
    now[0] = 0.9
    held = threading.Thread(target=lambda: b.record_final(p, [1]))
    held.start()
    held.join(0.3)
    assert held.is_alive(), "the next transaction waits for the stalled write"
    lines = [r.getMessage() for r in caplog.records if "to=<v@y.test>" in r.getMessage()]
    assert len(lines) == 2, "its delivery line is written first: the hold does not delay it"
    before = threading.Thread(target=writer.hold)  # a conversation about to start a transaction
    before.start()
    before.join(0.3)
    assert before.is_alive(), "no transaction starts while the write is stalled"

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "outcome write" in r.getMessage()]

    assert said() == [], "a hold shorter than STALL_WARN is a slow write, not an outage: nothing logged"
    now[0] = 0.5 + STALL_WARN
    deadline = time.monotonic() + 5
    while not said() and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    held.join(5)
    before.join(5)
    assert not held.is_alive() and not before.is_alive()
    assert len(said()) == 2 and "taken over 1.0 s" in said()[0] and "is over" in said()[1], said()  # once each
    assert stalls.count(metrics.OUTCOME_STALLS) == 1, "counted once, for the Prometheus exporter"
    free = threading.Thread(target=writer.hold)  # nothing stalled: at once
    free.start()
    free.join(5)
    assert not free.is_alive()
    b.drain()


def test_outcomes_that_come_together_go_in_one_write(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of transactions' outcomes (remote servers answer DATA together) is one script call."""
    writer = OutcomeWriter(store, gather=(0.5, 5.0))  # a generous gap: what the test does between is not timed
    b, p = batch(store, writer, FakeClock(2000.0))
    sizes: list[int] = []
    real = store.set_status_list

    def counted(entries: list[object], **kw: object) -> list[int]:
        sizes.append(len(entries))
        return real(entries, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "set_status_list", counted)
    p.outcomes[0] = SENT
    b.record_final(p, [0])
    p.outcomes[1] = SENT
    b.record_final(p, [1])
    b.drain()
    assert sizes == [2]
    assert {n: st.state for n, st in store.statuses("Q1").items()} == {0: RcptState.DELIVERED, 1: RcptState.DELIVERED}


def test_a_lone_outcome_is_written_after_the_gap_without_company(store: Store) -> None:
    writer = OutcomeWriter(store, gather=(0.05, 0.2))
    b, p = batch(store, writer, FakeClock(2000.0))
    p.outcomes[0] = SENT
    b.record_final(p, [0])
    done = threading.Thread(target=b.drain)
    done.start()
    done.join(10)  # written after the gap (0.05 s): nothing else is coming
    assert not done.is_alive()
    assert store.statuses("Q1")[0].state is RcptState.DELIVERED


def _drain_error(b: Batch) -> BaseException | None:
    """What ``b.drain()`` raised, asked in a thread that must be done within 5 s (a job that waits
    for ever for its outcomes fails the test instead of hanging it)."""
    raised: list[BaseException] = []

    def drain() -> None:
        try:
            b.drain()
        except Exception as e:
            raised.append(e)

    waiting = threading.Thread(target=drain)
    waiting.start()
    waiting.join(5)
    assert not waiting.is_alive(), "the job waits for ever for its outcomes"
    return raised[0] if raised else None


def test_a_job_that_cannot_take_in_its_written_outcomes_fails_and_the_writer_lives_on(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer thread serves every job of the process: an error taking in one job's answer
    fails that job (RQ runs it again), and the next job's outcomes are still written."""
    writer = OutcomeWriter(store, gather=(0.0, 0.0))
    b, p = batch(store, writer, FakeClock(2000.0))
    real = type(b).written

    def broken(self: object, *a: object) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(type(b), "written", broken)
    p.outcomes[0] = SENT
    b.record_final(p, [0])
    assert isinstance(_drain_error(b), ValueError), "the job hears of the error, it does not wait for ever"
    monkeypatch.setattr(type(b), "written", real)
    b2, p2 = batch(store, writer, FakeClock(2000.0))
    p2.outcomes[0] = SENT
    b2.record_final(p2, [0])
    b2.drain()  # written: the thread is alive
    assert b2.recorded[p2.envelope.id][0].state is RcptState.DELIVERED


def test_after_a_write_that_gave_up_on_redis_conversations_stay_held_until_it_answers(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis away past WRITE_PATIENCE: the jobs of that write fail (RQ runs them again), and no
    conversation starts another transaction until Redis answers a PING; released at once, each
    would deliver into the outage until the next write stalled."""
    import redis as redislib

    monkeypatch.setattr("worker.outcomes.WRITE_PATIENCE", -1.0)  # the first failure is the last
    back = threading.Event()

    def away(*a: object, **kw: object) -> list[int]:
        raise redislib.ConnectionError("Redis away")

    def ping() -> bool:
        if not back.is_set():
            raise redislib.ConnectionError("Redis away")
        return True

    monkeypatch.setattr(store, "set_status_list", away)
    monkeypatch.setattr(store.redis, "ping", ping)

    def nap(seconds: float) -> None:
        back.wait(0.01)

    writer = OutcomeWriter(store, stall=0.0, sleep=nap)
    b, p = batch(store, writer, FakeClock(2000.0))
    p.outcomes[0] = SENT
    b.record_final(p, [0])
    error = _drain_error(b)
    assert isinstance(error, redislib.ConnectionError), "the job hears at once that its outcome was not written"
    held = threading.Thread(target=writer.hold)
    held.start()
    held.join(0.3)
    assert held.is_alive(), "no transaction while Redis does not answer"
    back.set()
    held.join(5)
    assert not held.is_alive(), "released once Redis answers"


def test_a_write_retries_soon_after_redis_is_back_and_warns_every_few_seconds(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarting: the write goes through within RETRY_PAUSE of its return (a worker killed
    before then sends those deliveries again), and the outage is logged every RETRY_LOG_EVERY
    seconds, not at every attempt."""
    caplog.set_level("INFO", logger="mtaq.worker")
    now = [100.0]
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds

    failures = [0]
    real = store.set_status_list

    def restarting(*a: object, **kw: object) -> list[int]:
        if now[0] < 112.0:  # away for 12 s
            failures[0] += 1
            raise redis.ConnectionError("Connection refused")
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "set_status_list", restarting)
    writer = OutcomeWriter(store)
    b, p = batch(store, writer, FakeClock(2000.0))
    p.outcomes[0] = SENT
    entries = [(p.envelope.id, 0, b.account_attempt(p, 0, 2000.0, None))]
    write_outcomes(store, entries, monotonic=lambda: now[0], sleep=sleep)
    assert set(pauses) == {RETRY_PAUSE}
    assert 112.0 <= now[0] < 112.0 + RETRY_PAUSE + 1e-9, "written at the first attempt after Redis is back"
    warned = [r for r in caplog.records if "wait to be recorded" in r.getMessage()]
    assert len(warned) == 1 + int(12 // RETRY_LOG_EVERY), (len(warned), failures[0])
    assert store.statuses(p.envelope.id)[0].state is RcptState.DELIVERED


def test_the_stall_limit_follows_a_redis_far_away_up_to_the_old_limit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes that always take 60 ms (a Redis a long round trip away) must not each hold the
    conversations: the limit rises to STALL_FACTOR times the usual write, at most
    WRITE_STALL_REPLICATED; writes of a few milliseconds keep it at WRITE_STALL."""
    now = [0.0]
    took = [0.06]
    writer = OutcomeWriter(store, monotonic=lambda: now[0])
    assert writer.limit() == WRITE_STALL
    real = store.set_status_list

    def far(*a: object, **kw: object) -> list[int]:
        now[0] += took[0]
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "set_status_list", far)
    b, p = batch(store, writer, FakeClock(2000.0))
    for _ in range(20):
        p.outcomes[0] = SENT
        b.record_final(p, [0])
        b.drain()
    assert writer.limit() == pytest.approx(WRITE_STALL_REPLICATED), writer.limit()
    assert STALL_FACTOR * 0.06 > WRITE_STALL_REPLICATED > 0.06 > WRITE_STALL
    took[0] = 0.003
    for _ in range(30):
        p.outcomes[0] = SENT
        b.record_final(p, [0])
        b.drain()
    assert writer.limit() == WRITE_STALL, "back to 50 ms once writes are quick again"
