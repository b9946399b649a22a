"""worker/leases.py: a job's leases end with its success write on a worker pool's job thread
(``ends_with_success``), at once elsewhere and on an error."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest

from common.leasebook import LeaseBook
from common.store import leases_key
from worker.leases import Leases, ends_with_success, restage, staged_ends


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def held(r: fakeredis.FakeRedis) -> dict[Any, Any]:
    return r.hgetall(leases_key("y.test"))


def test_within_a_job_the_end_waits_for_the_success_write_and_goes_in_its_pipeline(r: fakeredis.FakeRedis) -> None:
    leases = Leases(LeaseBook(r), 20.0)
    r.rpush("mtaq:drawn:J1", "Q1")
    with ends_with_success():
        with leases.taken(["Q1", "Q2"], "y.test") as lease:
            lease.done = ["mtaq:drawn:J1"]
        assert set(held(r)) == {b"Q1", b"Q2"} and r.exists("mtaq:drawn:J1"), "ended in a round trip of its own"
        assert leases.in_flight() == 0, "no longer the process's to renew"
        [end] = staged_ends()
        assert staged_ends() == [], "taken once"
        with r.pipeline(transaction=False) as pipe:
            end.queue(pipe)
            pipe.set("another", "write")  # the success write's own commands
            pipe.execute()
        assert held(r) == {} and not r.exists("mtaq:drawn:J1", f"mtaq:holder:{lease.token}")
    assert r.get("another") == b"write"


def test_an_end_the_success_write_did_not_take_is_made_when_the_job_ends(r: fakeredis.FakeRedis) -> None:
    """A job that failed after its leases' block (or whose success write never ran)."""
    leases = Leases(LeaseBook(r), 20.0)
    r.rpush("mtaq:drawn:J1", "Q1")
    with ends_with_success():
        with leases.taken(["Q1"], "y.test") as lease:
            lease.done = ["mtaq:drawn:J1"]
        assert held(r) != {}
    assert held(r) == {} and not r.exists("mtaq:drawn:J1", f"mtaq:holder:{lease.token}")


def test_a_block_that_fails_ends_its_leases_at_once_and_keeps_what_it_was_not_done_with(
    r: fakeredis.FakeRedis,
) -> None:
    leases = Leases(LeaseBook(r), 20.0)
    r.rpush("mtaq:drawn:J1", "Q1")
    with ends_with_success():
        with pytest.raises(RuntimeError), leases.taken(["Q1"], "y.test") as lease:
            lease.done = ["mtaq:drawn:J1"]
            raise RuntimeError("the delivery failed")
        assert held(r) == {} and staged_ends() == []
    assert r.exists("mtaq:drawn:J1"), "kept for the job's re-run"


def test_outside_a_job_the_leases_end_with_their_block(r: fakeredis.FakeRedis) -> None:
    """`mtaq queue` and the sweep run service code on threads of their own: nobody writes a success."""
    leases = Leases(LeaseBook(r), 20.0)
    with leases.taken(["Q1"], "y.test"):
        assert held(r) != {}
    assert held(r) == {} and staged_ends() == []


def test_ends_left_are_given_up_quietly_when_redis_is_away() -> None:
    """They lapse with their holder key, as a dead worker's leases do; the job's thread goes on."""
    server = fakeredis.FakeServer()
    r = fakeredis.FakeRedis(server=server)
    leases = Leases(LeaseBook(r), 20.0)
    with ends_with_success():
        with leases.taken(["Q1"], "y.test"):
            pass
        server.connected = False  # every command now fails with a ConnectionError
    server.connected = True
    assert set(held(r)) == {b"Q1"}


def test_ends_given_back_after_a_failed_write_are_made_when_the_job_ends(r: fakeredis.FakeRedis) -> None:
    """worker/pool.py: a success write that raised gives its ends back (``restage``)."""
    leases = Leases(LeaseBook(r), 20.0)
    with ends_with_success():
        with leases.taken(["Q1"], "y.test"):
            pass
        ends = staged_ends()
        restage(ends)  # the write failed
        assert set(held(r)) == {b"Q1"}
    assert held(r) == {}


def test_a_nested_block_leaves_the_outer_one_its_ends(r: fakeredis.FakeRedis) -> None:
    leases = Leases(LeaseBook(r), 20.0)
    with ends_with_success():
        with leases.taken(["Q1"], "y.test"):
            pass
        with ends_with_success(), leases.taken(["Q2"], "y.test"):
            pass
        assert set(held(r)) == {b"Q1"}, "the inner block made its own ends only"
        assert len(staged_ends()) == 1
