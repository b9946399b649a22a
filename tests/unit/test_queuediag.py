"""tests/queuediag.py, what the chaos tests print about a message left queued: its recipients, its
leases, and every RQ job naming it with where RQ keeps it."""

from __future__ import annotations

import fakeredis

from common.envelope import Envelope, Recipient
from common.jobqueue import DeliveryQueue
from common.routing import Router
from common.spool import Spool
from common.store import Message, Store
from tests.queuediag import describe_stuck


def test_a_job_a_worker_took_and_never_started_is_found_where_it_waits() -> None:
    r = fakeredis.FakeRedis()
    queue = DeliveryQueue(r, "mtaq")
    spool = Spool(Store(r), queue, Router())
    msg = Message(Envelope(id="Q1", sender="a@client.test", recipients=[Recipient("b@a.test")]), b"x\r\n")
    spool.commit([msg])
    assert "in ['ready list']" in describe_stuck(r, "")
    r.lmove(queue.ready_key, queue.taken_key, "LEFT", "RIGHT")  # dequeued by a worker, then killed
    said = describe_stuck(r, "Dec  6 mtaq/worker: Q1: to=<b@a.test>, status=sent\nother line\n")
    assert said.startswith("Q1: left=1 recipients={0: ('pending', 0, 0.0)} leases={}")
    assert "status=queued" in said and "in ['intermediate list']: drain('a.test', " in said
    assert "in the pending list of a.test" in said
    assert "  log: Dec  6 mtaq/worker: Q1: to=<b@a.test>, status=sent" in said and "other line" not in said
