"""worker/limits.py on fakeredis with an injected clock: slots taken within the window and freed
exactly once, handed on with keep(), lapsing without a heartbeat; slow start; dead destinations;
the rate's schedule."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
import redis

from common.store import dest_key
from tests.unit.fakeclock import FakeClock
from worker.limits import (
    FAILED_KEPT,
    FULL_QUIET,
    INITIAL_WINDOW,
    LIMITED_FOR,
    SLOT_TTL,
    WANTS_KEY,
    WANTS_LOOK,
    WANTS_SLACK_MS,
    YIELD_GAP,
    DestinationLimits,
)


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
    other = limits(r, clock, concurrency=1)  # another worker process
    assert other.acquire("y.test") is None
    clock.now += SLOT_TTL + 1  # the holder died: no heartbeat
    assert other.acquire("y.test") is not None


def test_a_heartbeat_pushes_on_only_the_slots_still_held(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    """The refresh is one ZADD XX for every token of a destination: a slot dropped meanwhile (a
    lapse another process's acquire pruned, or an operator) is not taken back by it."""
    lim = limits(r, clock, concurrency=3)
    a, b = lim.acquire("y.test"), lim.acquire("y.test")
    assert a is not None and b is not None
    r.zrem("mtaq:dest:y.test:slots", b.token)  # gone behind this process's back
    clock.now += 5
    lim.heartbeat()
    scores: dict[bytes, float] = dict(r.zrange("mtaq:dest:y.test:slots", 0, -1, withscores=True))  # type: ignore[arg-type]
    assert list(scores) == [a.token.encode()] and scores[a.token.encode()] == pytest.approx(clock.now + SLOT_TTL)


def test_a_process_refused_a_slot_gets_the_next_one_freed(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    """A process whose conversations hold a destination's slots does not take back the slot one
    of them frees while another process waits for one: that one gets it (a burst to one
    destination left a second worker's job without a slot for 5 s, then handed back)."""
    busy, starved = limits(r, clock, concurrency=2), limits(r, clock, concurrency=2)
    a, b = busy.acquire("y.test"), busy.acquire("y.test")
    assert a is not None and b is not None
    assert starved.acquire("y.test") is None  # full: it waits, and says so
    a.free()
    assert busy.acquire("y.test") is None, "the freed slot is kept for the waiting process"
    got = starved.acquire("y.test")
    assert got is not None
    b.free()
    assert busy.acquire("y.test") is not None, "nobody waits: the slot is anyone's"
    assert r.get("mtaq:dest:y.test:want") is None


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


def test_a_full_window_s_successes_go_unrecorded_for_a_while(
    r: fakeredis.FakeRedis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    lim = limits(r, clock, concurrency=INITIAL_WINDOW + 1)
    fed: list[bool] = []
    feed = lim._feed

    def counted(destination: str, successes: int, reason: str, **kw: int) -> str:
        fed.append(successes > 0)
        return feed(destination, successes, reason, **kw)

    monkeypatch.setattr(lim, "_feed", counted)
    assert lim.succeeded("y.test") is False and lim.window("y.test") == INITIAL_WINDOW + 1  # full now
    clock.now += FULL_QUIET - 1
    assert lim.succeeded("y.test") is False and fed == [True], "quiet: not written"
    clock.now += 2
    assert lim.succeeded("y.test") is False and fed == [True, True], "the quiet is over"
    lim.failed("y.test", "refused")
    assert lim.window("y.test") == INITIAL_WINDOW
    lim.succeeded("y.test")
    assert fed[-2:] == [False, True], "a failure ends the quiet"
    assert lim.window("y.test") == INITIAL_WINDOW + 1, "the window grew back at once"


def test_rate_spaces_the_messages(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    lim = limits(r, clock, rate=2.0)
    # Lua turns the schedule into a 14-digit string: equal to a millisecond
    assert [lim.pace("y.test") for _ in range(3)] == pytest.approx([0.0, 0.5, 1.0], abs=1e-3)
    assert limits(r, clock).pace("y.test") == 0.0  # no rate set: never waits


def test_a_process_holding_slots_gives_one_up_at_a_time_to_a_waiting_process(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    busy, starved = limits(r, clock, concurrency=2), limits(r, clock, concurrency=2)
    assert busy.acquire("y.test") is not None
    assert not busy.should_yield("y.test"), "nobody waits"
    assert busy.acquire("y.test") is not None
    assert starved.acquire("y.test") is None  # it waits now
    assert not starved.should_yield("y.test"), "its own wait, and it holds nothing"
    assert busy.should_yield("y.test")
    assert not busy.should_yield("y.test"), "one slot at a time"
    clock.now += YIELD_GAP
    assert busy.should_yield("y.test")
    lone = limits(r, clock, concurrency=2)
    assert lone.acquire("z.test") is not None and limits(r, clock, concurrency=1).acquire("z.test") is None
    assert not lone.should_yield("z.test"), "its last slot for the destination is kept"


def test_the_process_holding_fewest_slots_claims_the_next_one(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    """A busy process refused more slots must not keep a starved one out: the one holding fewer
    takes the claim over, and the busy one gives a slot up for it."""
    busy, starved = limits(r, clock, concurrency=2), limits(r, clock, concurrency=2)
    a, b = busy.acquire("y.test"), busy.acquire("y.test")
    assert a is not None and b is not None
    assert busy.acquire("y.test") is None  # its lanes want more: it claims the next slot
    assert not busy.should_yield("y.test"), "its own claim"
    assert starved.acquire("y.test") is None  # holding none, it takes the claim over
    clock.now += WANTS_LOOK  # seen at the busy process's next look
    assert busy.should_yield("y.test")
    a.free()
    assert busy.acquire("y.test") is None, "kept for the starved process"
    assert starved.acquire("y.test") is not None


def counting(r: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch, *names: str) -> list[str]:
    """The names of these Redis client methods, as they are called from now on."""
    asked: list[str] = []

    def counted(name: str) -> Callable[..., Any]:
        real = getattr(r, name)

        def call(*a: Any, **kw: Any) -> Any:
            asked.append(name)
            return real(*a, **kw)

        return call

    for name in names:
        monkeypatch.setattr(r, name, counted(name))
    return asked


def test_a_process_reads_the_claims_once_and_hears_of_each_one_as_it_is_made(
    r: fakeredis.FakeRedis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing is read when the process subscribes (worker/claimwatch.py); after that no
    conversation's question asks Redis anything while no claim is listed, a claim is heard of as
    the acquire script publishes it, and its end as the claimer takes its slot."""
    busy, starved = limits(r, clock, concurrency=3), limits(r, clock, concurrency=3)
    slots = [busy.acquire("y.test") for _ in range(3)]
    asked = counting(r, monkeypatch, "get", "zrangebyscore")
    assert not any(busy.should_yield("y.test") for _ in range(10)), "nobody waits"
    assert asked == ["zrangebyscore"]  # once, when it subscribed
    assert starved.acquire("y.test") is None  # a claim, published
    assert busy.should_yield("y.test"), "heard of at once"
    assert asked == ["zrangebyscore", "get"]  # and the claim itself read, as a listed one is
    slots[0].free()  # type: ignore[union-attr]
    assert starved.acquire("y.test") is not None  # the claimer takes its slot: unlisted
    clock.now += YIELD_GAP
    assert not busy.should_yield("y.test") and asked == ["zrangebyscore", "get"]


def test_a_claim_nobody_unlists_lapses_with_its_listing(
    r: fakeredis.FakeRedis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    busy, starved = limits(r, clock, concurrency=3), limits(r, clock, concurrency=3)
    for _ in range(3):
        assert busy.acquire("y.test") is not None
    assert starved.acquire("y.test") is None and busy.should_yield("y.test")
    asked = counting(r, monkeypatch, "get", "zrangebyscore")
    # the claimer died: its claim lapsed (WANT_MS) and its listing after it (WANTS_SLACK_MS)
    clock.now += 1.0 + WANTS_SLACK_MS / 1000
    assert not busy.should_yield("y.test") and asked == []


def test_without_a_subscription_the_claims_are_read_once_a_look(
    r: fakeredis.FakeRedis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis refuses the subscription (or it fails): the set is read at most every WANTS_LOOK
    seconds for all the conversations, as before the subscription was there."""

    def refused(**kw: Any) -> Any:
        raise redis.ConnectionError("no pub/sub here")

    monkeypatch.setattr(r, "pubsub", refused)
    busy, starved = limits(r, clock, concurrency=3), limits(r, clock, concurrency=3)
    for _ in range(3):
        assert busy.acquire("y.test") is not None
    asked = counting(r, monkeypatch, "get", "zrangebyscore")
    assert not any(busy.should_yield("y.test") for _ in range(10))
    assert asked == ["zrangebyscore"]
    assert starved.acquire("y.test") is None
    assert not busy.should_yield("y.test"), "not seen before the next look"
    clock.now += WANTS_LOOK
    assert busy.should_yield("y.test") and asked == ["zrangebyscore", "zrangebyscore", "get"]


def test_a_listing_survives_clocks_apart_and_goes_with_the_claim(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    """A claim is listed for readers whose clock is ahead of the claimer's by less than
    WANTS_SLACK_MS, and unlisted once the claimer takes its slot."""
    behind = FakeClock(clock.now - 1.5)  # the claiming host's clock, 1.5 s behind the reader's
    busy, starved = limits(r, clock, concurrency=2), limits(r, behind, concurrency=2)
    a, b = busy.acquire("y.test"), busy.acquire("y.test")
    assert a is not None and b is not None
    assert starved.acquire("y.test") is None
    assert busy.should_yield("y.test"), "seen despite the clocks"
    a.free()
    assert starved.acquire("y.test") is not None
    assert r.zcard(WANTS_KEY) == 0


def test_a_claim_is_read_once_a_look_for_all_the_conversations(
    r: fakeredis.FakeRedis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    busy = limits(r, clock, concurrency=2)
    assert busy.acquire("y.test") is not None and busy.acquire("y.test") is not None
    assert busy.acquire("y.test") is None  # its own claim: listed, never a reason to yield
    gets: list[object] = []
    real = r.get
    monkeypatch.setattr(r, "get", lambda *a, **kw: gets.append(a) or real(*a, **kw))  # type: ignore[func-returns-value]
    assert not any(busy.should_yield("y.test") for _ in range(20))  # twenty conversations' looks
    assert len(gets) == 1
    clock.now += WANTS_LOOK
    assert not busy.should_yield("y.test") and len(gets) == 2


def test_several_slots_in_one_call_as_many_as_the_window_has_free(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    """A lane short of several conversations asks once; it gets what is free and, short of what it
    asked, claims the next slot freed, as a refusal does."""
    busy, starved = limits(r, clock, concurrency=20), limits(r, clock, concurrency=20)
    first = busy.acquire_many("y.test", 3)
    assert len(first) == 3 and r.get("mtaq:dest:y.test:want") is None  # room for all: no claim
    more = busy.acquire_many("y.test", 10)
    assert len(more) == INITIAL_WINDOW - 3 == slots(r) - 3 and busy.held() == INITIAL_WINDOW
    # the claim names what the process holds once the call is done: a process holding fewer
    # takes it over, one holding more does not
    assert r.get("mtaq:dest:y.test:want") == f"{busy.process}:{INITIAL_WINDOW}".encode()
    assert starved.acquire_many("y.test", 4) == []  # full; holding none, it takes the claim over
    assert starved.process in str(r.get("mtaq:dest:y.test:want"))
    first[0].free()
    first[1].free()
    # two free: the last one is kept for the claimant, so the busy process gets one of its four
    assert len(busy.acquire_many("y.test", 4)) == 1
    got = starved.acquire_many("y.test", 1)
    assert len(got) == 1 and r.get("mtaq:dest:y.test:want") is None  # all it asked: claim ended
    assert slots(r) == INITIAL_WINDOW and busy.acquire_many("y.test", 0) == []
    for slot in [*first[2:], *more, *got]:
        slot.free()


def test_a_claim_says_the_destination_is_wanted_elsewhere_but_not_by_its_own_process(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    """What an idle connection asks before it keeps its slot (worker/crew.py)."""
    holder, other = limits(r, clock, concurrency=1), limits(r, clock, concurrency=1)
    assert holder.acquire("y.test") is not None
    assert not holder.wanted_elsewhere("y.test")
    assert holder.acquire("y.test") is None  # its own claim
    clock.now += WANTS_LOOK
    assert not holder.wanted_elsewhere("y.test")
    assert other.acquire("y.test") is None  # holding none, the other takes the claim over
    clock.now += WANTS_LOOK
    assert holder.wanted_elsewhere("y.test") and not other.wanted_elsewhere("y.test")
    assert not holder.wanted_elsewhere("z.test")


def test_deliveries_news_rides_a_pipe_and_a_full_window_goes_quiet(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    """``news`` queues the news for the outcome writer's round trip (``ride``): a destination's
    deliveries in one script call, the window grown by one each; once it is full, news is not
    sent for FULL_QUIET."""
    lim = limits(r, clock, concurrency=INITIAL_WINDOW + 2)
    grew: list[str] = []
    assert lim.ride(r.pipeline(transaction=False), grew.append) is None, "no news: nothing queued"
    lim.news("y.test")
    lim.news("z.test")
    lim.news("y.test")
    pipe = r.pipeline(transaction=False)
    fed = lim.ride(pipe, grew.append)
    assert fed is not None and len(pipe) == 2
    fed(pipe.execute(raise_on_error=False))
    assert lim.window("y.test") == INITIAL_WINDOW + 2 and lim.window("z.test") == INITIAL_WINDOW + 1
    assert grew == ["z.test"], "y.test's window is full: quiet rather than grown"
    lim.news("y.test")
    pipe = r.pipeline(transaction=False)
    fed = lim.ride(pipe, grew.append)
    assert fed is None and len(pipe) == 0, "quiet"
    clock.now += FULL_QUIET + 1
    lim.news("y.test")
    assert lim.ride(r.pipeline(transaction=False), grew.append) is not None, "the quiet is over"


def test_a_window_that_refused_a_slot_holds_the_process_back_for_a_while(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    """``limited``: the crew sends a success's news at once only while the window holds this process
    back (it refused a slot in the last LIMITED_FOR seconds); else the news rides (``news``)."""
    lim = limits(r, clock, concurrency=20)
    assert not lim.limited("y.test")
    got = lim.acquire_many("y.test", INITIAL_WINDOW - 1)
    assert len(got) == INITIAL_WINDOW - 1 and not lim.limited("y.test"), "room for all: not held back"
    assert len(lim.acquire_many("y.test", 3)) == 1 and lim.limited("y.test")
    clock.now += LIMITED_FOR + 0.1
    assert not lim.limited("y.test")


def test_news_waiting_for_a_ride_goes_first_with_a_failure(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    """Successes whose news waits for a ride came before a failure: they go first, in the failure's
    round trip. A failure, a greeting, a failure, a greeting... is not failures in a row."""
    lim = limits(r, clock, concurrency=20, failure_limit=2)
    for _ in range(3):
        lim.news("y.test")
        assert not lim.failed("y.test", "refused"), "the success in between reset the count"
    assert r.hget("mtaq:dest:y.test:state", "failures") == b"1"
    pipe = r.pipeline(transaction=False)
    assert lim.ride(pipe, lambda d: None) is None and len(pipe) == 0, "nothing left to ride"
    assert lim.failed("y.test", "refused"), "two in a row"


def test_queued_news_goes_with_a_success_sent_at_once_a_refusal_and_the_heartbeat(
    r: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    """News never waits long for a ride: a success sent at once (the window holds the process back)
    takes it along, so does a refusal (it holds the process back from now on), and the heartbeat
    sends what no write took (a greeting, then a deferral)."""
    lim = limits(r, clock, concurrency=20)
    lim.news("y.test")
    lim.news("y.test")
    lim.succeeded("y.test")
    assert lim.window("y.test") == INITIAL_WINDOW + 3
    lim.acquire_many("z.test", INITIAL_WINDOW)
    lim.news("z.test")
    assert lim.acquire_many("z.test", 2) == [] and lim.window("z.test") == INITIAL_WINDOW + 1
    lim.news("w.test")
    grew: list[str] = []
    lim.heartbeat(grew.append)
    assert lim.window("w.test") == INITIAL_WINDOW + 1 and grew == ["w.test"]


def test_the_heartbeat_forgets_what_no_longer_counts_per_destination(r: fakeredis.FakeRedis, clock: FakeClock) -> None:
    """A worker reaching new domains all day kept an entry for each in its per-destination tables
    until it stopped; the heartbeat drops those that no longer count, and keeps those that do."""
    lim = limits(r, clock, concurrency=INITIAL_WINDOW)
    lim.acquire_many("old.test", INITIAL_WINDOW + 2)  # refused
    lim.failed("old.test", "refused")
    lim.succeeded("old.test")  # the window is full now: quiet
    assert "old.test" in lim._full_until
    lim._yielded_at["old.test"] = clock()
    clock.now += FAILED_KEPT + 1
    lim.acquire_many("new.test", INITIAL_WINDOW + 2)
    lim.heartbeat()
    tables = (lim._full_until, lim._refused_at, lim._yielded_at, lim._failed_at)
    assert not any("old.test" in t for t in tables)
    assert lim.limited("new.test") and "new.test" in lim._refused_at
