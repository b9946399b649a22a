"""worker/claimwatch.py on fakeredis: the listing read when the subscription opens, then kept by
what is published; opened again (and read again) every RESUBSCRIBE seconds; None when it cannot
say, and a fresh subscription after that."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
import redis

from tests.unit.fakeclock import FakeClock
from worker.claimwatch import RESUBSCRIBE, RETRY_AFTER, ClaimWatch

KEY = "mtaq:dest:wants"


def test_the_set_is_read_once_then_messages_keep_it() -> None:
    r, ticks = fakeredis.FakeRedis(), FakeClock(100.0)
    r.zadd(KEY, {"a.test": 5000})
    watch = ClaimWatch(r, KEY, monotonic=ticks)
    assert watch.listed(1.0) == frozenset({"a.test"})  # listed until 5 s (ms), read at the subscription
    r.publish(KEY, "b.test\t9000")
    r.publish(KEY, "a.test\t0")  # its claimer took a slot
    r.publish(KEY, "garbage")
    assert watch.listed(2.0) == frozenset({"b.test"})
    assert watch.listed(9.5) == frozenset(), "lapsed"


def test_the_subscription_is_opened_again_and_the_set_read_again() -> None:
    r, ticks = fakeredis.FakeRedis(), FakeClock(100.0)
    watch = ClaimWatch(r, KEY, monotonic=ticks)
    assert watch.listed(1.0) == frozenset()
    r.zadd(KEY, {"a.test": 5000})  # written, never published (a message lost with a connection)
    assert watch.listed(1.0) == frozenset()
    ticks.now += RESUBSCRIBE
    assert watch.listed(1.0) == frozenset({"a.test"})


def test_redis_trouble_says_nothing_and_a_new_subscription_waits_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failure the watch says nothing (the caller reads the set itself, once a look) and
    opens no new subscription for RETRY_AFTER seconds: Redis gone must not cost every
    conversation a connection attempt."""
    r, ticks = fakeredis.FakeRedis(), FakeClock(100.0)
    watch = ClaimWatch(r, KEY, monotonic=ticks)
    assert watch.listed(1.0) == frozenset()
    sub = watch._sub

    def broken(**kw: Any) -> Any:
        raise redis.ConnectionError("gone")

    monkeypatch.setattr(sub, "get_message", broken)
    assert watch.listed(1.0) is None
    r.zadd(KEY, {"a.test": 5000})
    assert watch.listed(1.0) is None and watch._sub is None, "not again at once"
    ticks.now += RETRY_AFTER
    assert watch.listed(1.0) == frozenset({"a.test"}) and watch._sub is not sub
    watch.close()
    assert watch._sub is None


def test_the_heartbeat_reads_the_subscription_and_lets_an_unused_one_go() -> None:
    r, ticks = fakeredis.FakeRedis(), FakeClock(100.0)
    watch = ClaimWatch(r, KEY, monotonic=ticks)
    assert watch.listed(1.0) == frozenset()
    r.publish(KEY, "a.test\t9000")
    watch.tick()  # read now: Redis keeps nothing for it in the meantime
    assert watch._scores == {"a.test": 9000}
    ticks.now += RESUBSCRIBE  # nobody asked for that long
    watch.tick()
    assert watch._sub is None
    r.zadd(KEY, {"b.test": 9000})
    assert watch.listed(1.0) == frozenset({"b.test"}), "the next question subscribes again"
