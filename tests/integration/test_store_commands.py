"""What a message costs Redis, command by command, on a real redis-server (INFO commandstats counts
the commands a script runs as well as the client's): one key a message, and a delivered
message's outcome that asks nothing about the hold set (issue 15)."""

from __future__ import annotations

import time

import redis

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.jobqueue import DRAIN_FUNC, DeliveryQueue
from common.leasebook import LeaseBook
from common.routing import Router
from common.spool import Spool
from common.statusscript import SET_STATUSES
from common.store import REMOVED, Message, Store, leases_key, msg_key
from tests.redisserver import RedisServer
from worker.limits import DestinationLimits


def calls(r: redis.Redis) -> dict[str, int]:
    got = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}
    got.pop("info", None)  # this very question
    return got


def spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0) > 0}


def message(qid: str) -> Message:
    env = Envelope(id=qid, sender="s@x.test", recipients=[Recipient("u@y.test")], received_at=1000.0)
    return Message(env, b"Subject: t\r\n\r\nbody\r\n")


def test_a_delivered_message_of_one_recipient(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    store = Store(r)
    store.commit([message("Q0")])  # y.test listed in the destinations' set, under a generation
    before = calls(r)
    store.commit([message("Q1"), message("Q2")])
    committed = spent(before, calls(r))
    assert committed["hset"] == 2 and "set" not in committed  # one key a message, no counter
    assert committed["get"] == 1 and "sadd" not in committed  # y.test listed already (queuestats.COMMIT)
    assert store.hold(["Q2"]) == ["Q2"]  # something is held: an older summary would ask the set
    r.script_load(SET_STATUSES)  # as a running worker has it
    book = LeaseBook(r)
    assert book.take(["Q1"], "y.test", "job-1", 20.0) == ["Q1"]
    before = calls(r)
    done = RecipientStatus(state=RcptState.DELIVERED, reply="250 ok", attempts=1)
    assert store.set_status_list([("Q1", 0, done)], last={"Q1": "y.test"}) == [REMOVED]
    outcome = spent(before, calls(r))
    assert "scard" not in outcome and "sismember" not in outcome and "srem" not in outcome, outcome
    # the state and the summary in one read; the message and its index entries removed
    assert outcome["hmget"] == 1 and "hget" not in outcome and outcome["del"] == 1, outcome
    assert sum(outcome.values()) == 8, outcome  # EVALSHA, HMGET, DEL, ZREM x2, HINCRBY x3
    assert not r.exists(msg_key("Q1"))
    assert book.holder("Q1", "y.test") == "job-1"  # until the job ends its leases, all at once
    book.end(["Q1"], "y.test", "job-1")
    assert not r.exists(leases_key("y.test"), "mtaq:holder:job-1")


def test_a_jobs_leases_cost_the_same_however_many_messages_it_has(redis_server: RedisServer) -> None:
    """issue 15: a job's leases are taken in one script call (HMGET, HSET, the hash's and the
    holder's TTL), pushed on with one PEXPIRE and ended in one call (HMGET, HDEL, DEL), where a
    lease a key a message was a SET a message. Another live job's leases are not taken; a dead
    one's (its holder key gone) are."""
    r = redis.Redis.from_url(redis_server.url)
    book = LeaseBook(r)
    ids = [f"Q{n}" for n in range(16)]
    assert book.take(ids[:2], "y.test", "other", 20.0) == ids[:2]
    before = calls(r)
    assert book.take(ids, "y.test", "job-1", 20.0) == ids[2:]
    taken = spent(before, calls(r))
    assert sum(taken.values()) == 6 and taken["exists"] == 1, taken  # + one look at the other holder
    book.end(["Q99"], "y.test", "nobody")  # the script loaded, as a running worker has it
    before = calls(r)
    book.renew(["job-1"], 20.0)
    book.end(ids, "y.test", "job-1")
    assert spent(before, calls(r)) == {"pexpire": 1, "evalsha": 1, "hmget": 1, "hdel": 1, "del": 1}
    assert [book.holder(q, "y.test") for q in ids[:3]] == ["other", "other", None]
    r.delete("mtaq:holder:other")  # its worker died: its leases lapse with it
    assert book.take(ids[:2], "y.test", "job-2", 20.0) == ids[:2]
    assert book.prune(["y.test"]) == 0
    r.delete("mtaq:holder:job-2")
    assert book.prune(["y.test"]) == 2 and not r.exists(leases_key("y.test"))


def test_a_jobs_load_reads_the_hold_flag_with_the_message(redis_server: RedisServer) -> None:
    """A summary that keeps the hold flag says whether its message is held: the load is one
    HGETALL a message, no look at the hold set (issue 15); an older summary asks the set."""
    r = redis.Redis.from_url(redis_server.url)
    store = Store(r, inline=True)
    store.commit([message("Q1"), message("Q2")])
    assert store.hold(["Q2"]) == ["Q2"]
    before = calls(r)
    loaded, held = store.load_with_hold(["Q1", "Q2", "GONE"])
    assert held == {"Q2"} and [x is not None for x in loaded] == [True, True, False]
    assert spent(before, calls(r)) == {"hgetall": 3}
    older = Store(r, inline=False)  # summaries without the flag, as an older mtaq wrote them
    older.commit([message("Q3"), message("Q4")])
    assert older.hold(["Q4"]) == ["Q4"]
    before = calls(r)
    loaded, held = store.load_with_hold(["Q3", "Q4"])
    assert held == {"Q4"} and all(x is not None for x in loaded)
    assert spent(before, calls(r))["smismember"] == 1


def test_a_job_of_thousands_of_messages_takes_and_ends_its_leases(redis_server: RedisServer) -> None:
    """Lua's unpack() is bounded by its stack (8000 values): the lease scripts pass long lists to
    Redis 1000 at a time (a bounce of 5,000 messages takes their leases in one call)."""
    r = redis.Redis.from_url(redis_server.url)
    book = LeaseBook(r)
    ids = [f"Q{n}" for n in range(5000)]
    assert book.take(ids, "y.test", "big", 20.0) == ids
    assert r.hlen(leases_key("y.test")) == 5000
    r.delete("mtaq:holder:big")  # its worker died
    assert book.take(ids[:4500], "y.test", "next", 20.0) == ids[:4500]  # taken over
    book.end(ids, "y.test", "next")
    assert r.hlen(leases_key("y.test")) == 500 and book.prune(["y.test"]) == 500


def test_a_jobs_leases_end_in_another_writes_pipeline_even_after_redis_lost_its_scripts(
    redis_server: RedisServer,
) -> None:
    """LeaseBook.end_in (worker/leases.py ``ends_with_success``): the end rides a job's success
    write by EVAL, so a Redis whose script cache was flushed (a restart, a failover) takes it in that
    same round trip; the drawn list goes with it. With the job's destination down asked in its
    load's round trip (worker/limits.py DownLook), on the same Redis."""
    r = redis.Redis.from_url(redis_server.url)
    book = LeaseBook(r)
    assert book.take(["Q1", "Q2"], "y.test", "job-1", 20.0) == ["Q1", "Q2"]
    r.rpush("mtaq:drawn:J1", "Q1", "Q2")
    r.script_flush()
    before = calls(r)
    with r.pipeline(transaction=False) as pipe:
        book.end_in(pipe, ["Q1", "Q2"], "y.test", "job-1", ["mtaq:drawn:J1"])
        pipe.delete("rq:job:J1")  # the success write's own
        pipe.execute()
    ended = spent(before, calls(r))
    assert ended.get("eval") == 1 and "script" not in ended and "evalsha" not in ended, ended
    assert not r.exists(leases_key("y.test"), "mtaq:holder:job-1", "mtaq:drawn:J1")
    store = Store(r)
    store.commit([message("Q3")])
    r.set("mtaq:dest:y.test:down", "too many failures", px=30_000)
    for expect_down in (True, False):
        look = DestinationLimits(r, concurrency=1, clock=time.time).look_down("y.test")
        [found], _ = store.load_with_hold(["Q3"], ride=look.stage)
        assert found is not None and found[0].envelope.id == "Q3"
        if expect_down:
            assert look.found is not None and look.found.reason == "too many failures"
            assert 29.0 < look.found.seconds <= 30.0
            r.delete("mtaq:dest:y.test:down")
        else:
            assert look.found is None


def test_a_drain_jobs_draw_rides_a_transaction_on_a_redis_that_lost_its_scripts(redis_server: RedisServer) -> None:
    """DeliveryQueue.draw_in (worker/rqbook.py start): by EVAL inside RQ's MULTI/EXEC, the share
    moved into the job's list and the next drain job queued for what is left, on a real Redis."""
    r = redis.Redis.from_url(redis_server.url)
    queue = DeliveryQueue(r, job_func=DRAIN_FUNC, draw_size=2)
    Spool(Store(r), queue, Router()).commit([message(f"D{n}") for n in range(3)])
    [job_id] = queue.rq.get_job_ids()
    r.script_flush()
    with r.pipeline() as pipe:
        pipe.set("rq:job:started-mark", "1")  # RQ's own writes of the start
        drawn = queue.draw_in(pipe, "y.test", job_id, 2)
        answers = pipe.execute(raise_on_error=False)
    assert drawn(answers[1:]) == ["D0", "D1"] == queue.drawn(job_id)
    assert queue.pending_ids("y.test") == ["D2"] and len(queue.rq.get_job_ids()) == 2, "the next job queued"
