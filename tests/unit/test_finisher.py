"""worker/finisher.py: the DSN and the delete of a finished message in one transaction, claimed so
that two finishers build one report, and the leases of the finishing job given back with it."""

from __future__ import annotations

import pathlib

import fakeredis
import pytest

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.jobqueue import DeliveryQueue
from common.leasebook import LeaseBook
from common.routing import Router
from common.settings import Settings
from common.spool import Spool
from common.store import Message, Store, claim_key, leases_key
from tests.dkimkeys import dkimpy_verify, write_table
from worker.finisher import Finisher

NOW = 1_700_000_000.0
BODY = b"From: a@client.test\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def spool() -> Spool:
    r = fakeredis.FakeRedis()
    return Spool(Store(r), DeliveryQueue(r, "mtaq"), Router())


def finisher(spool: Spool) -> Finisher:
    return Finisher(spool, "mtaq.test", clock=lambda: NOW)


def queued(spool: Spool, qid: str, state: RcptState, sender: str = "a@client.test") -> Message:
    msg = Message(Envelope(id=qid, sender=sender, recipients=[Recipient("b@a.test")], received_at=NOW - 60), BODY)
    spool.commit([msg])
    reply = "550 5.1.1 no such user" if state is RcptState.BOUNCED else "250 ok"
    spool.store.set_statuses({qid: {0: RecipientStatus(state, 1, "5.1.1", reply, updated=NOW)}})
    return msg


def loaded(spool: Spool, qid: str) -> tuple[Message, dict[int, RecipientStatus]]:
    found = spool.store.load_many([qid])[0]
    assert found is not None
    return found


def test_a_bounce_queues_its_dsn_and_deletes_the_message_together(spool: Spool) -> None:
    queued(spool, "Q1", RcptState.BOUNCED)
    assert finisher(spool).finish([loaded(spool, "Q1")]) == {"Q1"}
    assert spool.store.load("Q1") is None
    [dsn_id] = spool.store.queue_ids()
    dsn = spool.store.load(dsn_id)
    assert (
        dsn is not None
        and dsn.envelope.sender == ""
        and [r.address for r in dsn.envelope.recipients] == ["a@client.test"]
    )
    assert b"Action: failed" in dsn.body
    assert spool.store.redis.exists(claim_key("Q1", "finish")) == 1  # the claim, lapsing by itself


def test_a_message_another_finisher_claimed_is_left_and_looked_at_again(spool: Spool) -> None:
    queued(spool, "Q1", RcptState.BOUNCED)
    assert LeaseBook(spool.store.redis).claim(["Q1"], "finish", "another", 30.0) == ["Q1"]
    before = set(spool.queue.waiting_job_ids())  # the job the commit stored
    assert finisher(spool).finish([loaded(spool, "Q1")], "a.test") == set()
    assert spool.store.queue_ids() == ["Q1"]  # no second report, not deleted
    [job] = spool.queue.jobs([j for j in spool.queue.waiting_job_ids() if j not in before])
    assert (job.destination, job.ids) == ("a.test", ("Q1",))


def test_without_a_destination_a_claimed_message_waits_for_the_next_sweep(spool: Spool) -> None:
    queued(spool, "Q1", RcptState.BOUNCED)
    LeaseBook(spool.store.redis).claim(["Q1"], "finish", "another", 30.0)
    before = spool.queue.waiting_job_ids()
    assert finisher(spool).finish([loaded(spool, "Q1")]) == set()
    assert spool.queue.waiting_job_ids() == before
    assert spool.store.queue_ids() == ["Q1"]


def test_no_report_due_deletes_unclaimed_and_gives_back_the_jobs_lease(spool: Spool) -> None:
    queued(spool, "Q1", RcptState.DELIVERED)
    LeaseBook(spool.store.redis).take(["Q1"], "a.test", "job-token", 30.0)
    assert finisher(spool).finish([loaded(spool, "Q1")], "a.test", leased={"Q1"}) == {"Q1"}
    assert spool.store.queue_ids() == []  # delivered, NOTIFY not asked: no report
    r = spool.store.redis
    assert r.hlen(leases_key("a.test")) == 0 and r.exists(claim_key("Q1", "finish")) == 0


def test_never_a_report_for_a_bounce(spool: Spool) -> None:
    queued(spool, "Q1", RcptState.BOUNCED, sender="")
    assert finisher(spool).finish([loaded(spool, "Q1")]) == {"Q1"}
    assert spool.store.queue_ids() == []


def test_nothing_to_finish_touches_nothing(spool: Spool) -> None:
    assert finisher(spool).finish([]) == set()


def test_the_sweep_and_queue_bounce_sign_their_dsns(spool: Spool, tmp_path: pathlib.Path) -> None:
    # the Finisher the sweep and `mtaq queue bounce` build from settings signs as the worker's does
    table, keys = write_table(tmp_path, [("mtaq.test", "dsn", "ed25519")])
    settings = Settings(hostname="mtaq.test", dkim_keys=str(table))
    queued(spool, "Q1", RcptState.BOUNCED)
    assert Finisher.from_settings(settings, spool).finish([loaded(spool, "Q1")]) == {"Q1"}
    [dsn_id] = spool.store.queue_ids()
    dsn = spool.store.load(dsn_id)
    assert dsn is not None and dsn.body.startswith(b"DKIM-Signature:") and dkimpy_verify(dsn.body, keys)
    # without a key table nothing is signed
    queued(spool, "Q2", RcptState.BOUNCED)
    Finisher.from_settings(Settings(hostname="mtaq.test"), spool).finish([loaded(spool, "Q2")])
    unsigned = [spool.store.load(q) for q in spool.store.queue_ids() if q != dsn_id]
    assert len(unsigned) == 1 and unsigned[0] is not None and b"DKIM-Signature" not in unsigned[0].body


def test_a_finisher_that_saw_the_message_before_another_deleted_it_builds_no_second_report(spool: Spool) -> None:
    """The claim outlives the message it claims (FINISH_CLAIM): a job whose view of a finished
    message was taken before the sweep (or another job) finished it finds the claim taken, and
    queues no second report (the review of d48efd3, where the claim went with the message)."""
    queued(spool, "Q1", RcptState.BOUNCED)
    stale = loaded(spool, "Q1")
    assert finisher(spool).finish([loaded(spool, "Q1")]) == {"Q1"}  # the sweep: report and delete
    [report] = spool.store.queue_ids()
    assert finisher(spool).finish([stale], "a.test") == set()  # the job, a minute later
    assert spool.store.queue_ids() == [report]
