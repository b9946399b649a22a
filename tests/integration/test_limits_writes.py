"""The destination limits' scripts on a real redis-server: what they write. Every write is appended
to the AOF and fsynced (appendfsync always) before the reply, so a report that changes nothing
must not be a write (worker/limits.py _FEEDBACK), and the claims are listed for the processes to
read once for all their conversations (WANTS_KEY)."""

from __future__ import annotations

import time

import redis

from tests.redisserver import RedisServer
from tests.sinks import wait_for
from worker.limits import WANTS_KEY, DestinationLimits


def dirty(r: redis.Redis) -> int:
    """Writes since the last save (INFO persistence): what a write command or script adds to."""
    return int(r.info("persistence")["rdb_changes_since_last_save"])


def test_a_success_that_changes_nothing_writes_nothing(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    lim = DestinationLimits(r, concurrency=7, clock=time.time)
    assert lim._feed("y.test", 1, "") == ""  # window 5 -> 6, created: written
    before = dirty(r)
    assert lim._feed("y.test", 1, "") == "full"  # 6 -> 7, the limit: written
    assert dirty(r) > before and lim.window("y.test") == 7
    before = dirty(r)
    assert lim._feed("y.test", 1, "") == "full"  # full, no failure counted: nothing to write
    assert dirty(r) == before
    assert not lim.failed("y.test", "refused")  # a failure is written, and the window shrinks
    assert dirty(r) > before and lim.window("y.test") == 6
    before = dirty(r)
    assert lim._feed("y.test", 1, "") == "full"  # grows again, clears the failure count: written
    assert dirty(r) > before and lim.window("y.test") == 7
    before = dirty(r)
    assert lim._feed("y.test", 1, "") == "full"
    assert dirty(r) == before


def test_a_claim_is_listed_for_every_process_to_see(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    busy = DestinationLimits(r, concurrency=2, clock=time.time)
    starved = DestinationLimits(r, concurrency=2, clock=time.time)
    assert busy.acquire("y.test") is not None and busy.acquire("y.test") is not None
    assert r.zcard(WANTS_KEY) == 0
    assert starved.acquire("y.test") is None
    assert r.zrangebyscore(WANTS_KEY, int(time.time() * 1000), "+inf") == [b"y.test"]
    assert busy.should_yield("y.test")


def test_a_process_hears_of_claims_over_pub_sub_and_asks_redis_nothing_meanwhile(redis_server: RedisServer) -> None:
    """worker/claimwatch.py on a real redis-server: the acquire script's PUBLISH reaches another
    process's subscription, and a hundred conversations' questions while nothing is claimed cost
    Redis no command (issue 15: the look at the listing was 0.37 commands a message)."""
    r = redis.Redis.from_url(redis_server.url)
    busy = DestinationLimits(r, concurrency=2, clock=time.time)
    starved = DestinationLimits(r, concurrency=2, clock=time.time)
    held = [busy.acquire("y.test"), busy.acquire("y.test")]
    assert not busy.should_yield("y.test")  # subscribes, reads the listing once
    before = r.info("commandstats")
    assert not any(busy.should_yield("y.test") for _ in range(100))
    after = r.info("commandstats")
    after.pop("cmdstat_info")
    assert after == {k: v for k, v in before.items() if k != "cmdstat_info"}
    assert starved.acquire("y.test") is None  # a claim: published
    assert wait_for(lambda: busy.should_yield("y.test"), 5, 0.01), "the claim was not heard of"  # across a socket
    for slot in held:
        assert slot is not None
        slot.free()
    assert starved.acquire("y.test") is not None  # unlisted: published too
    assert wait_for(lambda: "y.test" not in busy._claimed(time.time()), 5, 0.01), "the claim's end was not heard of"


def _aof(rs: RedisServer) -> bytes:
    """Everything in the server's append-only file(s) (Redis 7 keeps several in a directory)."""
    return b"".join(p.read_bytes() for p in rs.dir.rglob("*.aof*") if p.is_file())


def test_the_limits_are_kept_out_of_the_append_only_file_and_a_restart_forgets_them(
    redis_server: RedisServer,
) -> None:
    """Slots, claims, windows, failure counts and down flags need no durability: a round trip
    that appends nothing costs Redis no write and no fsync (issue 15). A restart starts them over."""
    r = redis.Redis.from_url(redis_server.url)
    lim = DestinationLimits(r, concurrency=1, clock=time.time)
    r.set("mtaq:durable-probe", "1")  # a write that must be in the file (the test's own check)
    slot = lim.acquire("y.test")
    assert slot is not None and lim.acquire("y.test") is None  # the window is full: a claim
    assert lim.succeeded("y.test") is not None
    for _ in range(10):
        lim.failed("y.test", "refused")
    lim.news("z.test")  # its ride (the heartbeat's here) is kept out too
    assert lim.down("y.test") is not None and lim.heartbeat() == 1 and r.exists("mtaq:dest:z.test:state") == 1
    slot.free()
    assert r.zcard("mtaq:dest:y.test:slots") == 0
    aof = _aof(redis_server)
    assert b"mtaq:durable-probe" in aof
    assert b"mtaq:dest:" not in aof, aof[-2000:]
    other = lim.acquire("y.test")
    assert other is not None and r.zcard("mtaq:dest:y.test:slots") == 1
    redis_server.kill()  # a crash: what the file has is what comes back
    redis_server.start()
    r = redis.Redis.from_url(redis_server.url)
    assert r.get("mtaq:durable-probe") == b"1"
    assert r.keys("mtaq:dest:*") == []  # no slot held, not down, the window back to its start
    assert DestinationLimits(r, concurrency=1, clock=time.time).down("y.test") is None


def test_news_that_fails_in_redis_is_its_own_business(redis_server: RedisServer) -> None:
    """The ridden script catches its own errors (a real Redis's pcall around redis.call): a key of
    another type makes it answer -1, not an error that would fail the write it rides."""
    r = redis.Redis.from_url(redis_server.url)
    lim = DestinationLimits(r, concurrency=7, clock=time.time)
    r.set("mtaq:dest:y.test:state", "not a hash")
    lim.news("y.test")
    lim.news("x.test")
    grew: list[str] = []
    pipe = r.pipeline(transaction=False)
    pipe.set("mtaq:probe", "1")
    fed = lim.ride(pipe, grew.append)
    assert fed is not None
    answers = pipe.execute()  # raises on an error reply
    fed(answers[1:])
    assert sorted(answers[1:]) == [-1, 0] and grew == ["x.test"]
