"""The queue's shape: counts by state, qshape's age columns per destination, deferral reasons."""

from __future__ import annotations

import fakeredis

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.store import HOLD, Message, Store
from mtaq.ops.queueindex import counted_shape
from mtaq.ops.queueview import AGE_BUCKETS, age_bucket, load_views, reason_of, shape


def test_age_buckets_are_qshapes() -> None:
    assert [n for n, _ in AGE_BUCKETS] == ["0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80-160m", "older"]
    assert [age_bucket(a) for a in (0, 299, 300, 599, 1199, 2399, 4799, 9599, 9600, 10**6)] == [
        0,
        0,
        1,
        1,
        2,
        3,
        4,
        5,
        6,
        6,
    ]


def test_reasons_mask_queue_ids() -> None:
    assert reason_of("250 2.0.0 queued as 661BAA94A83D1FA0DC2") == reason_of("250 2.0.0 queued as 661BAA94B7FB7409605")


def test_shape_of_a_queue_in_known_states() -> None:
    r = fakeredis.FakeRedis()
    store = Store(r)
    now = 1_000_000.0
    envs = [
        Envelope(
            id="A1",
            sender="s@x.test",
            recipients=[Recipient("a@one.test"), Recipient("b@two.test")],
            received_at=now - 30,
        ),
        Envelope(id="A2", sender="s@x.test", recipients=[Recipient("c@one.test")], received_at=now - 4000),
        Envelope(id="A3", sender="", recipients=[Recipient("d@three.test")], received_at=now - 20000),
    ]
    store.commit([Message(e, b"x" * 10) for e in envs])
    store.set_statuses(
        {
            "A1": {
                0: RecipientStatus(state=RcptState.DELIVERED),
                1: RecipientStatus(state=RcptState.DEFERRED, reply="451 later"),
            },
            "A2": {0: RecipientStatus(state=RcptState.DEFERRED, reply="451 later")},
        }
    )
    r.sadd(HOLD, "A3")
    views = list(load_views(r))
    assert [v.qid for v in views] == ["A3", "A2", "A1"]  # arrival order, oldest first
    assert [v.state for v in views] == ["held", "deferred", "deferred"]
    assert all(v.size == 10 for v in views)
    sh = shape(views, now)
    assert sh.by_state == {"active": 0, "deferred": 2, "held": 1}
    # A1's one.test recipient is delivered: A1 counts only at two.test
    assert sh.destinations == {
        "two.test": [1, 0, 0, 0, 0, 0, 0],
        "one.test": [0, 0, 0, 0, 1, 0, 0],
        "three.test": [0, 0, 0, 0, 0, 0, 1],
    }
    assert sh.deferred_destinations == {"one.test", "two.test"}
    assert sh.reasons.most_common() == [("451 later", 2)]
    assert sh.oldest == now - 20000
    assert [v.qid for v in load_views(r, ids=["NOPE", "A2"])] == ["A2"]


def test_both_shapes_give_each_deferral_reason_its_bounce_class() -> None:
    # issue 19: `mtaq queue stats` reads the counted shape (mtaq/ops/queueindex.py), --exact the walk
    r = fakeredis.FakeRedis()
    store = Store(r)
    now = 1_000_000.0
    env = Envelope(id="B1", sender="s@x.test", recipients=[Recipient("a@one.test")], received_at=now - 30)
    store.commit([Message(env, b"x")])
    full = "host mx[192.0.2.1]:25 said: 452 4.2.2 <a@one.test>: Mailbox full"
    store.set_statuses({"B1": {0: RecipientStatus(state=RcptState.DEFERRED, dsn="4.2.2", reply=full)}})
    walked = shape(list(load_views(r)), now)
    counted = counted_shape(r, "", now)
    for sh in (walked, counted):
        assert list(sh.reason_class.values()) == ["MailboxFull"] and list(sh.reasons) == list(sh.reason_class)
