from __future__ import annotations

import fakeredis
import pytest
import redis

from common.envelope import LOG_STATUS, Envelope, RcptState, Recipient, RecipientStatus, outcome_of
from common.jobqueue import DRAIN_FUNC, DeliveryQueue
from common.queuestats import DROP_EMPTY
from common.routing import Router, next_hop
from common.spool import Spool
from common.statusscript import STATUSES_PER_CALL
from common.store import (
    INDEX,
    QCOUNTS,
    QDEST_PREFIX,
    QDESTS,
    QDESTS_GEN,
    Message,
    Store,
    StoreFull,
    StoreUnavailable,
    left_key,
    msg_key,
    qdest_key,
    rcpt_key,
)
from common.storeio import translated


def make_spool(r: redis.Redis, job_max_messages: int = 100) -> Spool:
    return Spool(Store(r), DeliveryQueue(r, "mtaq", job_max_messages=job_max_messages), Router())


@pytest.fixture
def spool() -> Spool:
    return make_spool(fakeredis.FakeRedis(), job_max_messages=2)


@pytest.fixture
def store(spool: Spool) -> Store:
    return spool.store


def env(qid: str, *rcpts: str, sender: str = "a@x.test") -> Envelope:
    return Envelope(id=qid, sender=sender, recipients=[Recipient(r) for r in rcpts], received_at=1000.0)


def test_commit_writes_body_once_state_and_one_job_per_destination(spool: Spool, store: Store) -> None:
    spool.commit([Message(env("Q1", "a@one.test", "b@one.test", "c@two.test"), b"body")])
    r = store.redis
    assert r.hget(msg_key("Q1"), "body") == b"body"
    # one key a message: no state written for a recipient not yet tried, no counter of its own
    assert sorted(r.hkeys(msg_key("Q1"))) == [b"body", b"env", b"q", b"v"]
    assert not r.exists(rcpt_key("Q1"), left_key("Q1"))
    assert store.statuses("Q1") == {i: RecipientStatus() for i in range(3)}  # none tried yet: pending
    loaded = store.load_many(["Q1"])[0]
    assert loaded is not None and loaded[0].body == b"body" and loaded[1] == {}  # the load: states tried
    assert r.zscore(INDEX, "Q1") == 1000.0
    # one drain job per destination, which will take the message off its pending list
    jobs = spool.queue.rq.get_jobs()
    assert sorted(j.args[0] for j in jobs) == ["one.test", "two.test"]
    assert all(j.func_name == DRAIN_FUNC and j.args[1] == j.id for j in jobs)
    assert spool.queue.pending_ids("one.test") == spool.queue.pending_ids("two.test") == ["Q1"]


def test_a_busy_destination_has_one_job_queued_however_many_commits(spool: Spool) -> None:
    for i in range(5):
        spool.commit([Message(env(f"Q{i}", "a@one.test"), b"x")])
    assert len(spool.queue.rq.get_jobs()) == 1
    assert spool.queue.pending_ids("one.test") == [f"Q{i}" for i in range(5)]
    assert spool.queue.pending() == 5


def test_a_commit_lists_its_destinations_until_the_sweep_takes_one_out(store: Store) -> None:
    """A destination with an index is in QDESTS (what the monitoring reads). A process that added
    one leaves out its SADD while the set's generation holds (issue 15: an SADD a destination a
    commit); the sweep's removal of an emptied destination starts a new generation, and then
    every destination is added again."""
    r = store.redis
    store.commit([Message(env("Q1", "a@one.test", "b@two.test"), b"x")])
    assert r.smembers(QDESTS) == {b"one.test", b"two.test"} and r.exists(QDESTS_GEN)
    r.srem(QDESTS, "one.test")  # behind the writers' back: the generation says it is still there
    store.commit([Message(env("Q2", "a@one.test"), b"x")])
    assert r.smembers(QDESTS) == {b"two.test"}, "a destination it listed under this generation: no SADD"
    store.commit([Message(env("Q3", "a@three.test"), b"x")])
    assert r.smembers(QDESTS) == {b"two.test", b"three.test"}, "one it did not list yet: added"
    r.zrem(qdest_key("two.test"), "Q1")  # two.test's index empty: the sweep takes it out
    assert r.eval(DROP_EMPTY, 2, QDESTS, QDESTS_GEN, QDEST_PREFIX, "g2") == 1
    assert r.smembers(QDESTS) == {b"three.test"} and r.get(QDESTS_GEN) == b"g2"
    store.commit([Message(env("Q4", "a@one.test"), b"x")])
    assert r.smembers(QDESTS) == {b"one.test", b"three.test"}, "a new generation: listed again"
    r.delete(QDESTS, QDESTS_GEN)  # a flushed or restored Redis
    store.commit([Message(env("Q5", "a@one.test"), b"x")])
    assert r.smembers(QDESTS) == {b"one.test"} and r.exists(QDESTS_GEN)


def test_what_a_process_knows_of_the_listed_destinations_lasts_a_minute_or_until_a_failure() -> None:
    """What the generation cannot tell (a failover that lost the SADD but kept the generation; an
    older mtaq's sweep, which removes without a new generation) is asked again a minute later,
    and at once after a commit failed (a lost connection may be a failover)."""
    server = fakeredis.FakeServer()
    r = fakeredis.FakeRedis(server=server)
    store = Store(r)
    store.commit([Message(env("Q1", "a@one.test"), b"x")])
    r.srem(QDESTS, "one.test")  # lost, the generation kept
    store.commit([Message(env("Q2", "a@one.test"), b"x")])
    assert not r.sismember(QDESTS, "one.test")
    store._dests_until = 0.0  # a minute later
    store.commit([Message(env("Q3", "a@one.test"), b"x")])
    assert r.sismember(QDESTS, "one.test")
    r.srem(QDESTS, "one.test")
    server.connected = False
    with pytest.raises(StoreUnavailable):
        store.commit([Message(env("Q4", "a@one.test"), b"x")])
    server.connected = True
    store.commit([Message(env("Q5", "a@one.test"), b"x")])
    assert r.sismember(QDESTS, "one.test")


def test_commit_hands_the_body_to_redis_py_uncopied(store: Store) -> None:
    """The body goes into the transaction as a view of the message's own bytes: redis-py writes a
    memoryview as it is, where hiredis's packer copies a bytes argument into the command."""
    body = b"x" * 100_000
    seen: list[object] = []

    def look(pipe: redis.client.Pipeline) -> None:
        for args, _ in pipe.command_stack:
            if args[0] == "HSET" and args[1] == msg_key("Q9"):
                seen.append(args[args.index("body") + 1])

    store.commit([Message(env("Q9", "a@one.test"), body)], also=look)
    assert len(seen) == 1 and isinstance(seen[0], memoryview) and seen[0].obj is body
    assert store.redis.hget(msg_key("Q9"), "body") == body


def test_commit_returns_how_many_jobs_it_stored(spool: Spool) -> None:
    # flow control counts messages per job from this: drain jobs take draw_size (here
    # job_max_messages, 2) at most
    batch = [Message(env(f"Q{i}", "a@one.test"), b"x") for i in range(3)] + [Message(env("Q9", "b@two.test"), b"x")]
    assert spool.commit(batch) == 2
    assert len(spool.queue.rq.get_jobs()) == 2
    assert spool.commit([], delete=["Q9"]) == 0


def test_commit_is_all_or_nothing() -> None:
    server = fakeredis.FakeServer()
    r = fakeredis.FakeRedis(server=server)
    s = make_spool(r)
    server.connected = False
    with pytest.raises(StoreUnavailable):
        s.commit([Message(env("Q1", "a@one.test"), b"x")])
    server.connected = True
    assert r.keys("*") == []


def test_final_status_counts_down_once(store: Store) -> None:
    store.commit([Message(env("Q1", "a@one.test", "b@one.test"), b"x")])
    done = RecipientStatus(RcptState.DELIVERED, attempts=1, dsn="2.0.0")
    assert store.set_statuses({"Q1": {0: done}}) == {"Q1": [1]}
    # a re-run job reports the same recipient again: nothing changes
    assert store.set_statuses({"Q1": {0: done}}) == {"Q1": [-1]}
    deferred = RecipientStatus(RcptState.DEFERRED, attempts=1, dsn="4.0.0")
    assert store.set_statuses({"Q1": {1: deferred}}) == {"Q1": [-3]}
    assert store.set_statuses({"Q1": {1: RecipientStatus(RcptState.BOUNCED, dsn="5.1.1")}}) == {"Q1": [0]}
    assert store.statuses("Q1")[1].state is RcptState.BOUNCED
    assert store.stats() == {"received": 1, "delivered": 1, "deferred": 1, "bounced": 1}


def test_the_last_outcome_removes_its_message_in_the_same_script(store: Store) -> None:
    """issue 15: ``last`` names messages the outcome finishes with no report due: the message, its
    index entries and its counters' share go with the outcome (-4); a message with another open
    recipient is only recorded (the finisher comes after it). Its job's lease stays until the job
    ends them all (worker/leases.py)."""
    store.commit([Message(env("Q1", "a@one.test"), b"body"), Message(env("Q2", "a@one.test", "b@one.test"), b"x")])
    r = store.redis
    done = RecipientStatus(RcptState.DELIVERED, attempts=1, dsn="2.0.0")
    last = {"Q1": "one.test", "Q2": "one.test"}
    assert store.set_status_list([("Q1", 0, done), ("Q2", 0, done)], last=last) == [-4, 1]
    assert not r.exists(msg_key("Q1"), rcpt_key("Q1"), left_key("Q1"))
    assert r.zscore(INDEX, "Q1") is None and r.zscore(qdest_key("one.test"), "Q1") is None
    assert r.exists(msg_key("Q2")) == 1, "Q2 has an open recipient: it stays"
    assert store.stats()["delivered"] == 2
    # Q2's body and its open recipient
    assert (int(r.hget(QCOUNTS, "bytes") or 0), int(r.hget(QCOUNTS, "r:active") or 0)) == (1, 1)
    # a re-run job: the message is gone, nothing is written again
    assert store.set_status_list([("Q1", 0, done)], last=last) == [-2]
    # Q2's last open recipient: removed by its outcome too
    assert store.set_status_list([("Q2", 1, done)], last=last) == [-4]
    assert not r.exists(msg_key("Q2")) and store.queue_size() == 0
    assert int(r.hget(QCOUNTS, "bytes") or 0) == 0


def test_delete_in_same_transaction_as_new_message(store: Store) -> None:
    store.commit([Message(env("Q1", "a@one.test"), b"x")])
    store.commit([Message(env("B1", "a@x.test", sender=""), b"dsn")], delete=["Q1"])
    assert store.load("Q1") is None
    assert store.queue_ids() == ["B1"]
    loaded = store.load("B1")
    assert loaded is not None and loaded.envelope.is_bounce and loaded.body == b"dsn"


@pytest.mark.parametrize(
    ("relayhost", "hop"),
    [
        ("", "example.com"),
        ("smart.test", "[smart.test]"),
        ("smart.test:2525", "[smart.test]:2525"),
        ("[10.0.0.1]:26", "[10.0.0.1]:26"),
    ],
)
def test_next_hop(relayhost: str, hop: str) -> None:
    assert next_hop("User@Example.COM.", relayhost) == hop


def test_envelope_round_trip() -> None:
    e = Envelope(
        id="Q",
        sender="",
        recipients=[Recipient("a@b", ("SUCCESS", "FAILURE"), "rfc822;a@b")],
        body_8bit=True,
        smtputf8=True,
        ret="HDRS",
        envid="x+y",
        auth_user="u",
    )
    assert Envelope.from_json(e.to_json()) == e
    st = RecipientStatus(RcptState.DEFERRED, 3, "4.4.1", "connect refused", "none", "mx", 5.0)
    assert RecipientStatus.from_json(st.to_json()) == st


def test_batches_respect_message_and_byte_limits() -> None:
    s = DeliveryQueue(fakeredis.FakeRedis(), "mtaq", job_max_messages=3, job_max_bytes=100)
    sized = [("a", 10), ("b", 10), ("c", 10), ("d", 10), ("e", 95), ("f", 200), ("g", 1)]
    assert s.batches(sized) == [["a", "b", "c"], ["d"], ["e"], ["f"], ["g"]]


def test_walk_and_enqueue_sized(spool: Spool, store: Store) -> None:
    spool.commit([Message(env(f"Q{i}", "a@one.test"), b"x") for i in range(3)])
    spool.queue.empty()
    assert spool.queue.pending() == 0 and spool.queue.pending_ids("one.test") == []
    chunks = list(store.walk(chunk=2))
    assert [[m.envelope.id for m, _ in c] for c in chunks] == [["Q0", "Q1"], ["Q2"]]
    assert spool.queue.enqueue_sized({"one.test": [("Q0", 1), ("Q1", 1), ("Q2", 1)]}, force=True) == 3
    assert sorted(len(j.args[1]) for j in spool.queue.rq.get_jobs()) == [1, 2]  # job_max_messages=2
    assert all(j.args[2] is True for j in spool.queue.rq.get_jobs())


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), StoreFull),
        # what redis-py raises for an OOM inside MULTI/EXEC: the "OOM" prefix is gone from the text
        (
            redis.exceptions.OutOfMemoryError(
                "Command # 1 (HSET k a) of pipeline caused error: command not allowed when used memory > 'maxmemory'."
            ),
            StoreFull,
        ),
        (redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'."), StoreFull),
        (redis.ConnectionError("Connection refused"), StoreUnavailable),
        (redis.TimeoutError("Timeout reading from socket"), StoreUnavailable),
        (redis.ResponseError("EXECABORT Transaction discarded"), StoreUnavailable),
        (ConnectionResetError("reset by peer"), StoreUnavailable),
    ],
)
def test_redis_errors_become_store_errors(error: Exception, raised: type[Exception]) -> None:
    with pytest.raises(raised), translated():
        raise error


@pytest.mark.parametrize(
    ("code", "state"),
    [
        (250, RcptState.DELIVERED),
        ("2.1.5", RcptState.DELIVERED),
        (421, RcptState.DEFERRED),
        ("4.4.1", RcptState.DEFERRED),
        (550, RcptState.BOUNCED),
        ("5.1.1", RcptState.BOUNCED),
        ("", RcptState.DEFERRED),
        (999, RcptState.DEFERRED),
    ],
)
def test_outcome_of(code: int | str, state: RcptState) -> None:
    assert outcome_of(code) is state
    assert state.final is (state is not RcptState.DEFERRED)
    assert LOG_STATUS[state] == ("sent" if state is RcptState.DELIVERED else state.value)


def test_many_outcomes_go_in_calls_of_a_bounded_size_and_count_once_each(store: Store) -> None:
    # more than one script call's worth (STATUSES_PER_CALL), a state each way, a message twice
    n = STATUSES_PER_CALL + 50
    store.commit([Message(env(f"Q{i}", "a@one.test", "b@one.test"), b"x") for i in range(n)])
    done = RecipientStatus(RcptState.DELIVERED, attempts=1, dsn="2.0.0")
    later = RecipientStatus(RcptState.DEFERRED, attempts=1, dsn="4.0.0", next_attempt=2e3)
    entries = [(f"Q{i}", 0, done) for i in range(n)] + [("Q0", 1, later), ("Q0", 0, done)]
    assert store.set_status_list(entries) == [1] * n + [-3, -1]
    assert store.stats() == {"received": n, "delivered": n, "deferred": 1}
