"""worker/lane.py: a lane's parcels, floors and conversation count under one lock, and Lanes
forgetting a lane once no job uses it and no conversation runs on it."""

from __future__ import annotations

from common.envelope import Envelope, RcptState, Recipient
from tests.unit.fakeclock import FakeClock
from tests.unit.fakepeer import target
from worker.lane import Lane, Lanes
from worker.parcel import Outcome, Parcel


class Owner:
    def __init__(self) -> None:
        self.finished: list[str] = []

    def record(self, parcel: Parcel, positions: list[int]) -> None:
        pass

    def done(self, parcel: Parcel) -> None:
        self.finished.append(parcel.envelope.id)


def parcel(qid: str) -> Parcel:
    return Parcel(Envelope(id=qid, sender="a@x.test", recipients=[Recipient("u@y.test")]), b"x", [0])


def test_floors_keep_a_deferred_parcel_for_the_next_target() -> None:
    lane = Lane([target("192.0.2.1"), target("192.0.2.2")])
    p = parcel("Q1")
    lane.add([p], Owner())
    assert lane.take(0) is p
    lane.back(p, 1)
    assert lane.take(0) is None and lane.has(1) and lane.take(1) is p


def test_withdraw_takes_only_that_jobs_parcels_and_left_tells_the_owners() -> None:
    lane, mine, theirs = Lane([target()]), Owner(), Owner()
    a, b = parcel("QA"), parcel("QB")
    lane.add([a], mine)
    lane.add([b], theirs)
    assert lane.withdraw([a]) == [a] and len(lane) == 1
    assert lane.left() == [b] and theirs.finished == ["QB"] and mine.finished == []


def test_a_parcel_with_nothing_pending_is_not_added() -> None:
    lane, p = Lane([target()]), parcel("Q1")
    p.outcomes[0] = Outcome(RcptState.DELIVERED, "2.0.0", "ok", "r")
    lane.add([p], Owner())
    assert len(lane) == 0


def test_shortfall_counts_conversations_and_honours_the_pause() -> None:
    lane = Lane([target()])
    lane.add([parcel("Q1"), parcel("Q2")], Owner())
    assert lane.shortfall(now=0.0) == 2
    lane.started()
    assert lane.shortfall(now=0.0) == 1
    lane.started()
    assert lane.shortfall(now=0.0) == 0  # two parcels, two conversations
    assert not lane.ended()  # one still runs
    lane.pause(until=5.0)
    assert lane.shortfall(now=4.9) == 0 and lane.shortfall(now=5.0) == 1
    assert lane.ended()  # the last one; and a conversation ending lifts the pause
    lane.pause(until=5.0)
    lane.started()
    lane.ended()
    assert lane.shortfall(now=0.0) == 2


def six_parcels_two_conversations(clock: FakeClock) -> Lane:
    lane = Lane([target()], clock=clock)
    lane.add([parcel(f"Q{i}") for i in range(6)], Owner())
    lane.started()
    lane.started()
    return lane


def test_where_transactions_are_slow_a_conversation_in_one_is_not_counted_on() -> None:
    clock = FakeClock(0.0)
    lane = six_parcels_two_conversations(clock)
    assert lane.shortfall(now=0.0) == 4  # two starting conversations will take two of the six
    first, second = lane.take(0), lane.take(0)
    assert first is not None and second is not None
    assert lane.shortfall(now=0.0) == 2  # quick so far (nothing measured): busy ones count
    clock.now = 1.0
    lane.finished(first)  # a second a transaction: the moving average passes SLOW_TRANSACTION
    assert lane.shortfall(now=1.0) == 3  # one in a transaction, one free: three of four wait
    third = lane.take(0)
    assert third is not None
    assert lane.shortfall(now=1.0) == 3  # both in a transaction: the three left want their own
    lane.back(third, 1)
    assert lane.shortfall(now=1.0) == 3  # four wait, one conversation is free for them


def test_where_transactions_are_quick_a_busy_conversation_takes_the_next_parcel() -> None:
    clock = FakeClock(0.0)
    lane = six_parcels_two_conversations(clock)
    p = lane.take(0)
    assert p is not None
    clock.now = 0.01
    lane.finished(p)  # 10 ms a transaction
    assert lane.take(0) is not None and lane.take(0) is not None
    assert lane.shortfall(now=0.01) == 1  # two busy for a moment: they take two of the three left


def test_lanes_forget_a_lane_when_the_last_job_and_conversation_are_gone() -> None:
    lanes = Lanes()
    with lanes.joined("y.test", [target()]) as lane:
        with lanes.joined("y.test", [target("192.0.2.9")]) as same:
            assert same is lane and lane.targets == [target()]  # the first job's resolution
        lane.started()
    assert lanes.get("y.test") is lane  # a conversation still runs on it
    assert lanes.ended("y.test", lane)
    assert lanes.get("y.test") is None and len(lanes) == 0
    with lanes.joined("y.test", [target("192.0.2.9")]) as fresh:
        assert fresh is not lane and fresh.targets == [target("192.0.2.9")]
    assert len(lanes) == 0


def test_a_conversation_ending_keeps_a_lane_a_job_still_uses() -> None:
    lanes = Lanes()
    with lanes.joined("y.test", [target()]) as lane:
        lane.started()
        lanes.ended("y.test", lane)
        assert lanes.get("y.test") is lane
    assert lanes.get("y.test") is None
