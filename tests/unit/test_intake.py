"""worker/intake.py: a worker process takes a job only while fewer messages than it wants wait in
it for a conversation; a drain job's share counts from its start until its parcels are in a lane."""

from __future__ import annotations

import threading

from worker.intake import Intake


class Lanes:
    def __init__(self) -> None:
        self.parcels = 0

    def waiting(self) -> int:
        return self.parcels


def test_shares_count_until_their_parcels_are_in_a_lane() -> None:
    lanes = Lanes()
    i = Intake(want=10, draw=10, waiting=lanes.waiting)
    assert i.wait_room(0)
    i.begin("d1", None)
    assert i.share("d1") == 10 and i.load == 10
    assert not i.wait_room(0.01)
    lanes.parcels = 10  # the job put them in its lane
    i.landed("d1")
    assert i.load == 10 and i.share("d1") == 10
    lanes.parcels = 3  # conversations took seven
    assert i.wait_room(0)
    i.begin("old", 4)  # a job naming its messages counts them all
    assert i.load == 7 and i.share("never-begun") == 10
    i.end("old")
    i.end("old")  # twice: nothing more
    assert i.load == 3


def test_room_comes_as_conversations_take_parcels() -> None:
    lanes = Lanes()
    lanes.parcels = 12
    i = Intake(want=10, draw=10, waiting=lanes.waiting)
    taker = threading.Timer(0.1, lambda: setattr(lanes, "parcels", 9))
    taker.start()
    assert i.wait_room(5.0)
    taker.join()


def test_a_job_that_ends_before_landing_gives_its_share_back() -> None:
    i = Intake(want=10, draw=10, waiting=lambda: 0)
    i.begin("d", None)
    assert not i.wait_room(0)
    i.end("d")
    assert i.wait_room(0)


def test_with_every_conversation_permit_in_use_no_more_than_one_share_waits_here() -> None:
    """What waits here then waits for one of this process's conversations to end, while another
    process with a free permit could send it now: the queue keeps it for that one."""
    lanes, free = Lanes(), [0]
    i = Intake(want=100, draw=10, waiting=lanes.waiting, free=lambda: free[0])
    lanes.parcels = 9
    assert i.has_room()  # less than a share waits: one more job keeps the conversations fed
    lanes.parcels = 10
    assert not i.has_room() and not i.wait_room(0.01)
    free[0] = 1  # a conversation ended: its permit may take the next job's mail
    assert i.has_room()
    lanes.parcels = 100
    assert not i.has_room()  # ``want`` still bounds it


def test_with_shares_of_two_rounds_a_busy_process_still_holds_one_round_at_most() -> None:
    """A drain job's share is two rounds of a process's conversations (common/jobqueue.py), as
    much as ``want``: the bound while every permit is in use is one round (``busy``), or a busy
    process would take jobs until twice its conversations waited in it (the review of 95dee87)."""
    lanes, free = Lanes(), [0]
    i = Intake(want=20, draw=20, waiting=lanes.waiting, free=lambda: free[0], busy=10)
    lanes.parcels = 9
    assert i.has_room()
    lanes.parcels = 10
    assert not i.has_room()
    free[0] = 2
    assert i.has_room() and i.share("job") == 20
    lanes.parcels = 20
    assert not i.has_room()
