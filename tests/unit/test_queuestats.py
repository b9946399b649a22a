"""The queue's counters and indexes (common/queuestats.py, common/queueindex.py) against a walk of
the queue, after any sequence of what changes it: commits, recipient states, holds, releases,
deletions, finishing; and the recount that corrects what bypassed them."""

from __future__ import annotations

import json

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus, domain_of
from common.events import Event, EventType, parse_entries
from common.queuerecount import recount, stream_ids
from common.queuestats import commit_plan, summary
from common.store import EVENTS, QCOUNTS, Message, Store, msg_key, qdest_key
from mtaq.ops.queueindex import exact_counts, read_counts, selected_ids
from mtaq.ops.queueview import load_views

NOW = 100_000.0


def msg(n: int, domains: list[str], at: float) -> Message:
    rcpts = [Recipient(f"u{n}.{j}@{d}") for j, d in enumerate(domains)]
    return Message(Envelope(id=f"Q{n:04d}", sender="a@s.test", recipients=rcpts, received_at=at), b"x" * (50 + n))


def agree(r: fakeredis.FakeRedis) -> None:
    counted, walked = read_counts(r, NOW), exact_counts(load_views(r), NOW)
    assert counted == walked


def test_summary_names_destinations_once_and_each_recipients() -> None:
    env = msg(1, ["a.test", "b.test", "a.test"], 5.5).envelope
    want = '{"h":["a.test","b.test"],"t":"5.5","n":3,"i":[0,1,0],"o":[2,1],"p":3,"d":0,"k":1}'
    assert summary(env, domain_of) == want
    one = msg(2, ["a.test", "a.test"], 5.0).envelope
    assert summary(one, domain_of) == '{"h":["a.test"],"t":"5.0","n":2,"o":[2],"p":2,"d":0,"k":1}'
    plan = commit_plan([(env, 10), (one, 20)], domain_of)
    assert (plan.size, plan.recipients) == (30, 5)
    assert plan.by_destination == {"a.test": {"Q0001": 5.5, "Q0002": 5.0}, "b.test": {"Q0001": 5.5}}
    # a commit's summaries carry the body's octets: the removal reads them there, not the body
    assert json.loads(plan.summaries["Q0001"])["b"] == 10 and json.loads(plan.summaries["Q0002"])["b"] == 20


def test_a_removal_takes_the_size_from_the_summary_and_an_older_one_from_the_body() -> None:
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    s = Store(r)
    s.commit([msg(1, ["a.test"], NOW), msg(2, ["a.test"], NOW)])
    before = int(r.hget("mtaq:queue:counts", "bytes") or 0)
    size1 = r.hstrlen(msg_key("Q0001"), "body")
    # Q0002 as an older mtaq left it: a summary without ``b``
    old = json.loads(r.hget(msg_key("Q0002"), "q") or b"{}")
    del old["b"]
    r.hset(msg_key("Q0002"), "q", json.dumps(old))
    size2 = r.hstrlen(msg_key("Q0002"), "body")
    done = RecipientStatus(state=RcptState.DELIVERED, reply="250 ok")
    assert s.set_status_list([("Q0001", 0, done), ("Q0002", 0, done)], last={"Q0001": "a.test", "Q0002": "a.test"}) == [
        -4,
        -4,
    ]
    assert int(r.hget("mtaq:queue:counts", "bytes") or 0) == before - size1 - size2 == 0
    agree(r)


def test_counts_follow_each_change_and_the_indexes_answer_listings() -> None:
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    s = Store(r)
    s.commit([msg(i, [f"d{(i + j) % 3}.test" for j in range(i % 3 + 1)], NOW - 60 * i) for i in range(10)])
    agree(r)
    deferred = RecipientStatus(state=RcptState.DEFERRED, reply="451 4.3.0 later")
    s.set_statuses({"Q0001": {0: deferred, 1: RecipientStatus(state=RcptState.DELIVERED)}})
    agree(r)
    assert s.hold(["Q0001", "Q0002"]) == ["Q0001", "Q0002"]
    agree(r)
    s.set_statuses({"Q0002": {0: deferred}})
    agree(r)
    assert s.unhold(["Q0002"]) == ["Q0002"]
    agree(r)
    s.delete("Q0001")  # held, with a deferred recipient
    agree(r)
    assert s.set_statuses({"Q0000": {0: RecipientStatus(state=RcptState.BOUNCED)}}) == {"Q0000": [0]}
    agree(r)  # finished, not yet deleted: counted as the walk sees it (a crash may leave it so)
    s.commit([], delete=["Q0000"])  # finished: deleted as the worker does
    agree(r)
    c = read_counts(r, NOW)
    assert c.messages == 8 and c.by_state == {"active": 7, "deferred": 1, "held": 0}
    assert selected_ids(r, NOW, deferred=True) == ["Q0002"]
    assert selected_ids(r, NOW, domain="D1.test.") == ["Q0008", "Q0007", "Q0005", "Q0004", "Q0002"]
    assert selected_ids(r, NOW, older_than=5 * 60 + 1) == ["Q0009", "Q0008", "Q0007", "Q0006"]
    s.hold(["Q0003"])
    assert selected_ids(r, NOW, hold=True) == ["Q0003"]
    assert [q for chunk in stream_ids(r, 3) for q in chunk] == [f"Q{i:04d}" for i in range(9, 1, -1)]


def test_stream_ids_gives_messages_of_one_arrival_time_once_each() -> None:
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    Store(r).commit([msg(i, ["a.test"], NOW) for i in range(7)])
    chunks = list(stream_ids(r, 3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert sorted(q for c in chunks for q in c) == [f"Q{i:04d}" for i in range(7)]


def test_recount_corrects_what_bypassed_the_scripts() -> None:
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    s = Store(r)
    s.commit([msg(i, ["a.test", "b.test"], NOW - i) for i in range(5)])
    r.hincrby(QCOUNTS, "bytes", 77)  # a counter off
    r.zadd(qdest_key("a.test"), {"GONE": 1.0})  # an index entry of a message not queued
    r.hdel(msg_key("Q0003"), "q")  # a message from before the counters (counted again: drift)
    r.zrem(qdest_key("b.test"), "Q0002")  # an index entry missing
    with pytest.raises(AssertionError):
        agree(r)
    first = recount(s, domain_of)
    assert (first.messages, first.repaired, first.removed) == (5, 2, 1)
    assert not first.applied  # its own repairs changed the counters during the walk: not trusted
    second = recount(s, domain_of)
    assert second.applied and second.repaired == 0
    assert second.drift == {"bytes": 77 + 53, "r:active": 2}  # the message counted twice, and the 77
    agree(r)
    assert recount(s, domain_of).drift == {}


STATES = [RcptState.PENDING, RcptState.DEFERRED, RcptState.DELIVERED, RcptState.BOUNCED]
op = st.one_of(
    st.tuples(st.just("commit"), st.lists(st.sampled_from(["a.test", "b.test", "c.test"]), min_size=1, max_size=4)),
    st.tuples(st.just("status"), st.integers(0, 30), st.integers(0, 3), st.sampled_from(STATES)),
    st.tuples(st.just("hold"), st.integers(0, 30)),
    st.tuples(st.just("release"), st.integers(0, 30)),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("finish"), st.integers(0, 30)),
    # a final outcome that removes its message when it is the last open recipient (issue 15)
    st.tuples(st.just("last"), st.integers(0, 30), st.integers(0, 3), st.sampled_from(STATES[2:])),
    # several outcomes in one script call: the queue counters are summed and added once at its end
    st.tuples(
        st.just("many"),
        st.integers(0, 30),
        st.lists(st.tuples(st.integers(0, 30), st.integers(0, 3), st.sampled_from(STATES)), min_size=2, max_size=5),
    ),
)


DOMAIN_LISTS = st.lists(st.sampled_from(["a.test", "b.test", "c.test"]), min_size=1, max_size=4)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(DOMAIN_LISTS, min_size=1, max_size=6), st.lists(op, max_size=40))
def test_counts_equal_a_walk_after_any_sequence(first: list[list[str]], ops: list[tuple[object, ...]]) -> None:
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    # events on (issue 19): the one outcome script keeps the counters and appends the events
    s = Store(r, events_max=100_000)
    changes = 0
    s.commit([msg(n, domains, NOW - 400 * n) for n, domains in enumerate(first)])
    made = len(first)
    agree(r)
    for o in ops:
        kind, *rest = o
        if kind == "commit":
            domains = rest[0]
            assert isinstance(domains, list)
            s.commit([msg(made, domains, NOW - 400 * made)])
            made += 1
            continue
        n = rest[0]
        assert isinstance(n, int)
        qid = f"Q{n % made:04d}"
        if kind == "many":
            outcomes = rest[1]
            assert isinstance(outcomes, list)
            entries = [
                (f"Q{m % made:04d}", i % 4, RecipientStatus(state=sta, reply="451 busy")) for m, i, sta in outcomes
            ]
            evs: list[Event | None] = [
                Event(id=f"{q}.{i}.{len(ops)}.{k}", type=EventType.TRANSIENT, time=NOW, queue_id=q)
                for k, (q, i, _) in enumerate(entries)
            ]
            finishing = {q: "a.test" for q, _, sta in entries if sta.final}
            codes = s.set_status_list(entries, events=evs, last=finishing)
            changes += sum(c not in (-1, -2) for c in codes)
            agree(r)
            assert len(parse_entries(r.xrange(EVENTS))) == changes  # an entry a call, its events in it
            continue
        if kind in ("status", "last"):
            idx, state = rest[1], rest[2]
            assert isinstance(idx, int) and isinstance(state, RcptState)
            ev = Event(id=f"{qid}.{idx % 4}.{len(ops)}", type=EventType.TRANSIENT, time=NOW, queue_id=qid)
            last = {qid: "a.test"} if kind == "last" else None
            entry = (qid, idx % 4, RecipientStatus(state=state, reply="451 busy"))
            code = s.set_status_list([entry], events=[ev], last=last)
            changes += code[0] not in (-1, -2)  # written exactly when the state is
            if code[0] == -4:
                assert not r.exists(msg_key(qid)) and r.zscore("mtaq:index", qid) is None
        elif kind == "hold":
            s.hold([qid])
        elif kind == "release":
            s.unhold([qid])
        elif kind == "delete":
            s.delete(qid)
        else:
            s.commit([], delete=[qid])
        agree(r)
        assert len(parse_entries(r.xrange(EVENTS))) == changes  # an entry a call, its events in it
    assert recount(s, domain_of).drift == {}


def test_read_counts_can_keep_to_the_largest_destinations() -> None:
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    Store(r).commit([msg(i, [f"d{i % 5}.test"] * (1 + i % 5), NOW - i) for i in range(5)] + [msg(9, ["d4.test"], NOW)])
    full = read_counts(r, NOW)
    assert {d: sum(row) for d, row in full.destinations.items()} == {
        "d0.test": 1,
        "d1.test": 1,
        "d2.test": 1,
        "d3.test": 1,
        "d4.test": 2,
    }
    two = read_counts(r, NOW, top=2)
    assert list(two.destinations) == ["d0.test", "d4.test"]  # the largest, then the first by name
    assert two.messages == full.messages and two.by_state == full.by_state


def test_a_commit_of_thousands_of_messages_to_one_destination() -> None:
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    Store(r).commit([msg(i, ["big.test"], NOW - i) for i in range(5000)])  # past Lua's unpack() bound
    assert sum(read_counts(r, NOW).destinations["big.test"]) == 5000


def test_the_recount_of_a_message_with_thousands_of_recipients() -> None:
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    s = Store(r)
    s.commit([msg(1, ["a.test", "b.test"] * 4500, NOW)])
    r.hdel(msg_key("Q0001"), "q")
    assert recount(s, domain_of).repaired == 1  # its own repair changed the counters: not applied
    assert recount(s, domain_of).applied
    agree(r)
