"""worker/relay.py: one conversation over a lane, against an in-memory peer (tests/unit/fakepeer.py):
outcomes per recipient, the next MX after a 4xx or a refused connection, 50 recipients per
transaction, destination_messages_per_connection, and what goes back to the cache."""

from __future__ import annotations

from common.envelope import Envelope, RcptState, Recipient
from tests.unit.fakepeer import FakeDialer, FakePeer, target
from worker.lane import Lane
from worker.parcel import Parcel
from worker.relay import RCPTS_PER_TRANSACTION, converse


class Owner:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, list[int]]] = []
        self.finished: list[str] = []

    def record(self, parcel: Parcel, positions: list[int]) -> None:
        self.recorded.append((parcel.envelope.id, list(positions)))

    def done(self, parcel: Parcel) -> None:
        self.finished.append(parcel.envelope.id)


def parcel(qid: str, *rcpts: str) -> Parcel:
    env = Envelope(id=qid, sender="a@x.test", recipients=[Recipient(r) for r in rcpts], received_at=1000.0)
    return Parcel(env, b"Subject: t\r\n\r\nhi\r\n", list(range(len(rcpts))))


def test_outcomes_per_recipient_and_final_ones_recorded_right_after_the_transaction() -> None:
    peer = FakePeer(replies={"bad@y.test": (550, "5.1.1 no such user"), "later@y.test": (451, "4.3.0 try later")})
    lane, owner = Lane([target()]), Owner()
    p = parcel("Q1", "ok@y.test", "bad@y.test", "later@y.test")
    lane.add([p], owner)
    opened, reached = converse(lane, FakeDialer(peer))
    assert reached and opened is not None and opened.sent == 1  # alive: goes to the cache
    assert [p.outcomes[i].state for i in range(3)] == [RcptState.DELIVERED, RcptState.BOUNCED, RcptState.DEFERRED]
    assert p.outcomes[1].dsn == "5.1.1" and "host mx.test[192.0.2.1]:25 said: 550 5.1.1" in p.outcomes[1].reply
    assert owner.recorded == [("Q1", [0, 1])]  # the deferred one is the job's to record
    assert owner.finished == ["Q1"] and len(lane) == 0
    assert peer.taken == [("192.0.2.1", "a@x.test", ["ok@y.test"])]


def test_a_deferred_recipient_gets_the_next_mx() -> None:
    peer = FakePeer(at={"192.0.2.1": (451, "4.3.0 busy")})
    first, second = target("192.0.2.1"), target("192.0.2.2", preference=20)
    lane, owner = Lane([first, second]), Owner()
    p = parcel("Q1", "u@y.test")
    lane.add([p], owner)
    opened, _ = converse(lane, FakeDialer(peer))
    assert peer.opened == ["192.0.2.1", "192.0.2.2"]
    assert p.outcomes[0].state is RcptState.DELIVERED and p.outcomes[0].relay == "mx.test[192.0.2.2]:25"
    assert opened is not None and opened.target == 1


def test_a_refused_connection_moves_on_and_the_lane_remembers_why() -> None:
    peer = FakePeer(refuse={"192.0.2.1", "192.0.2.2"})
    lane, owner = Lane([target("192.0.2.1"), target("192.0.2.2")]), Owner()
    p = parcel("Q1", "u@y.test")
    lane.add([p], owner)
    heard: list[tuple[bool, str]] = []
    opened, reached = converse(lane, FakeDialer(peer), feedback=lambda ok, why: heard.append((ok, why)))
    assert opened is None and not reached
    assert [ok for ok, _ in heard] == [False, False]
    assert len(lane) == 1 and p.outcomes == {}  # nobody took it: it waits for the job (or left())
    assert lane.last.state is RcptState.DEFERRED and "Connection refused" in lane.last.reply


def test_recipients_go_fifty_to_a_transaction() -> None:
    peer = FakePeer()
    lane, owner = Lane([target()]), Owner()
    n = RCPTS_PER_TRANSACTION + 7
    p = parcel("Q1", *(f"u{i}@y.test" for i in range(n)))
    lane.add([p], owner)
    converse(lane, FakeDialer(peer))
    assert [len(r) for _, _, r in peer.taken] == [RCPTS_PER_TRANSACTION, 7]
    assert [len(pos) for _, pos in owner.recorded] == [RCPTS_PER_TRANSACTION, 7]


def test_messages_per_connection_then_a_fresh_connection_and_none_cached() -> None:
    peer = FakePeer()
    lane, owner = Lane([target()]), Owner()
    lane.add([parcel(f"Q{i}", "u@y.test") for i in range(4)], owner)
    opened, _ = converse(lane, FakeDialer(peer, messages_per_connection=2))
    assert len(peer.opened) == 2 and len(peer.taken) == 4
    assert opened is None  # the last one carried its share: quit, not cached
    lane.add([parcel("Q5", "u@y.test")], owner)
    opened, _ = converse(lane, FakeDialer(peer, messages_per_connection=2))
    assert opened is not None and opened.sent == 1  # room for more: back to the cache


def test_a_peer_that_hangs_up_leaves_the_rest_to_a_new_connection() -> None:
    peer = FakePeer(hang_up_after=1)
    lane, owner = Lane([target()]), Owner()
    lane.add([parcel("Q1", "u@y.test"), parcel("Q2", "v@y.test")], owner)
    converse(lane, FakeDialer(peer))
    # the server broke off after Q1: the rest go to the next address, and there is none
    assert peer.opened == ["192.0.2.1"] and owner.finished == ["Q1"] and len(lane) == 1


def test_stopping_ends_the_conversation_before_the_next_message() -> None:
    peer = FakePeer()
    lane, owner = Lane([target()]), Owner()
    lane.add([parcel("Q1", "u@y.test")], owner)
    opened, reached = converse(lane, FakeDialer(peer), stopping=lambda: True)
    # it tried no server, so it failed at none: "reached", or what waits would get its failure
    assert (opened, reached) == (None, True) and peer.opened == [] and len(lane) == 1


def test_slow_start_hears_of_each_greeted_connection_and_each_delivered_message() -> None:
    """A server that limits connections says so as it greets (worker/limits.py): a greeted
    connection grows the window before its first message is through."""
    peer = FakePeer(replies={"later@y.test": (451, "4.3.0 try later")})
    lane, owner = Lane([target()]), Owner()
    lane.add([parcel("Q1", "ok@y.test"), parcel("Q2", "later@y.test")], owner)
    heard: list[bool] = []
    converse(lane, FakeDialer(peer), feedback=lambda ok, why: heard.append(ok))
    assert heard == [True, True]  # the greeting, then Q1 delivered (Q2's deferral says nothing)


def test_a_parcel_whose_pacing_fails_goes_back_to_its_lane() -> None:
    """``pace`` asks Redis (destination_rate): when that fails the parcel was not sent, and it
    waits for its turn again rather than being lost with the conversation."""
    lane, owner = Lane([target()]), Owner()
    lane.add([parcel("Q1", "ok@y.test")], owner)

    def broken() -> None:
        raise ConnectionError("Redis unavailable")

    try:
        converse(lane, FakeDialer(FakePeer()), pace=broken)
    except ConnectionError:
        pass
    else:
        raise AssertionError("the failure is the conversation's")
    assert len(lane) == 1 and owner.finished == []
    assert lane.shortfall(now=0.0) == 1  # nothing is counted as in a conversation's hands


def test_a_conversation_asked_to_stop_while_held_sends_nothing_more() -> None:
    """A stop that comes while ``pace`` waits (the outcome writer's hold while Redis is down, or
    the destination's pacing): the parcel taken goes back to its lane unsent, not delivered when the
    hold lifts with nowhere to record it."""
    lane, owner = Lane([target()]), Owner()
    lane.add([parcel("Q1", "ok@y.test"), parcel("Q2", "ok@y.test")], owner)
    stop = False

    def held() -> None:
        nonlocal stop
        stop = True  # SIGTERM arrives during the wait

    peer = FakePeer()
    converse(lane, FakeDialer(peer), pace=held, stopping=lambda: stop)
    assert owner.recorded == [] and owner.finished == []
    assert len(lane) == 2  # both wait in the lane, for the hand-back
