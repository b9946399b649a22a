"""One key a message (common/statusscript.py LAYOUT): the recipients' states live in the message
hash, and a message an older mtaq queued (states in ``mtaq:rcpt:<id>``, a counter in
``mtaq:left:<id>``) is still loaded, listed, recorded, finished, repaired and removed as it was."""

from __future__ import annotations

import json

import fakeredis
import pytest
import redis

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus, domain_of
from common.store import REMOVED, Message, Store, left_key, msg_key, rcpt_key
from mtaq.ops.queueindex import exact_counts, read_counts
from mtaq.ops.queueview import load_views

NOW = 1000.0
DEFERRED = RecipientStatus(state=RcptState.DEFERRED, reply="451 4.3.0 later", attempts=1)
DELIVERED = RecipientStatus(state=RcptState.DELIVERED, reply="250 ok", attempts=1)


def message(qid: str, *addresses: str) -> Message:
    env = Envelope(id=qid, sender="s@x.test", recipients=[Recipient(a) for a in addresses], received_at=NOW)
    return Message(env, b"Subject: t\r\n\r\nbody\r\n")


def as_older(r: redis.Redis, qid: str, n: int) -> None:
    """Rewrite a message just committed the way the mtaq before this layout stored it."""
    r.hdel(msg_key(qid), "v")
    r.hset(rcpt_key(qid), mapping={str(i): RecipientStatus().to_json() for i in range(n)})
    r.set(left_key(qid), n)


@pytest.fixture
def store() -> Store:
    return Store(fakeredis.FakeRedis(server=fakeredis.FakeServer()))


def agree(store: Store) -> None:
    assert read_counts(store.redis, NOW) == exact_counts(load_views(store.redis), NOW)


@pytest.mark.parametrize("older", [False, True])
def test_outcomes_then_the_last_one_finishes_the_message(store: Store, older: bool) -> None:
    store.commit([message("Q1", "a@one.test", "b@one.test", "c@two.test")])
    if older:
        as_older(store.redis, "Q1", 3)
    assert store.set_status_list([("Q1", 0, DEFERRED)]) == [-3]
    assert store.set_status_list([("Q1", 1, DELIVERED)]) == [2]  # two left
    assert store.statuses("Q1")[0].state is RcptState.DEFERRED
    loaded = store.load_many(["Q1"])[0]
    assert loaded is not None
    got = [loaded[1].get(i, RecipientStatus()).state for i in range(3)]
    assert got == [RcptState.DEFERRED, RcptState.DELIVERED, RcptState.PENDING]
    assert sorted(loaded[1]) == ([0, 1, 2] if older else [0, 1])  # an older one wrote them all at first
    views = list(load_views(store.redis))
    assert [rv.status.state for rv in views[0].recipients] == [
        RcptState.DEFERRED,
        RcptState.DELIVERED,
        RcptState.PENDING,
    ]
    agree(store)
    # a re-run job's outcome for a final recipient changes nothing
    assert store.set_status_list([("Q1", 1, DELIVERED)]) == [-1]
    assert store.set_status_list([("Q1", 0, DELIVERED), ("Q1", 2, DELIVERED)]) == [1, 0]
    agree(store)
    store.delete("Q1")
    assert not store.redis.exists(msg_key("Q1"), rcpt_key("Q1"), left_key("Q1"))
    assert read_counts(store.redis, NOW).messages == 0


@pytest.mark.parametrize("older", [False, True])
def test_the_last_outcome_removes_a_message_with_no_report_due(store: Store, older: bool) -> None:
    store.commit([message("Q1", "a@one.test")])
    if older:
        as_older(store.redis, "Q1", 1)
    assert store.set_status_list([("Q1", 0, DELIVERED)], last={"Q1": "one.test"}) == [REMOVED]
    assert not store.redis.exists(msg_key("Q1"), rcpt_key("Q1"), left_key("Q1"))
    agree(store)


def test_an_index_the_message_does_not_have_is_not_a_pending_recipient(store: Store) -> None:
    store.commit([message("Q1", "a@one.test")])
    assert store.set_status_list([("Q1", 1, DEFERRED), ("Q9", 0, DEFERRED)]) == [-2, -2]
    assert store.statuses("Q1") == {0: RecipientStatus()}
    agree(store)


@pytest.mark.parametrize("older", [False, True])
def test_the_sweeps_repair_counts_the_states_where_they_are(store: Store, older: bool) -> None:
    store.commit([message("Q1", "a@one.test", "b@two.test")])
    if older:
        as_older(store.redis, "Q1", 2)
    store.set_status_list([("Q1", 1, DEFERRED)])
    loaded = store.load_many(["Q1"])[0]
    assert loaded is not None
    # counted from the states where they are: the summary was right, nothing to change
    changed, _, _, pending, deferred = store.repair(loaded[0].envelope, domain_of)
    assert (changed, pending, deferred) == (0, 1, 1)
    agree(store)


def test_a_summary_without_the_hold_flag_asks_the_hold_set_and_the_repair_adds_the_flag(store: Store) -> None:
    store.commit([message("Q1", "a@one.test", "b@one.test")])
    assert store.hold(["Q1"]) == ["Q1"]
    assert json.loads(store.redis.hget(msg_key("Q1"), "q") or b"{}")["g"] == 1
    older = json.loads(store.redis.hget(msg_key("Q1"), "q") or b"{}")
    del older["k"], older["g"]  # as an older mtaq wrote it: the hold set alone says it is held
    store.redis.hset(msg_key("Q1"), "q", json.dumps(older))
    assert store.set_status_list([("Q1", 0, DEFERRED)]) == [-3]
    agree(store)  # counted as held, from the set
    loaded = store.load_many(["Q1"])[0]
    assert loaded is not None
    assert store.repair(loaded[0].envelope, domain_of)[0] == 0  # nothing to correct ...
    q = json.loads(store.redis.hget(msg_key("Q1"), "q") or b"{}")
    assert (q["k"], q["g"]) == (1, 1)  # ... but the flag is kept in the summary from now on
    assert store.unhold(["Q1"]) == ["Q1"] and "g" not in json.loads(store.redis.hget(msg_key("Q1"), "q") or b"{}")
    agree(store)


def test_a_summary_that_undercounts_never_answers_a_negative_count(store: Store) -> None:
    """The count of open recipients is the summary's: drifted below the truth it answers 0 (the
    finisher then looks at the states: worker/service.py), never a negative number that another
    answer's code would take it for."""
    store.commit([message("Q1", "a@one.test", "b@one.test")])
    q = json.loads(store.redis.hget(msg_key("Q1"), "q") or b"{}")
    q["p"] = 0
    store.redis.hset(msg_key("Q1"), "q", json.dumps(q))
    assert store.set_status_list([("Q1", 0, DELIVERED)]) == [0]


def test_until_the_gate_opens_new_mail_is_written_as_an_older_mtaq_wrote_it() -> None:
    """A process that has not seen the layout gate open (an older worker may run) writes the
    recipients hash, the counter and a summary without the hold flag, which every version reads."""
    store = Store(fakeredis.FakeRedis(server=fakeredis.FakeServer()), inline=False)
    store.commit([message("Q1", "a@one.test", "b@one.test")])
    r = store.redis
    assert r.hget(msg_key("Q1"), "v") is None and r.hlen(rcpt_key("Q1")) == 2 and r.get(left_key("Q1")) == b"2"
    assert "k" not in json.loads(r.hget(msg_key("Q1"), "q") or b"{}")
    assert store.set_status_list([("Q1", 0, DELIVERED)]) == [1]
    assert store.hold(["Q1"]) == ["Q1"]
    agree(store)
    loaded = store.load_many(["Q1"])[0]
    assert loaded is not None
    store.repair(loaded[0].envelope, domain_of)
    assert "k" not in json.loads(r.hget(msg_key("Q1"), "q") or b"{}")  # the repair adds no flag either
    assert store.set_status_list([("Q1", 1, DELIVERED)]) == [0]
