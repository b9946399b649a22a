"""Kill things with SIGKILL and check that accepted mail survives: the promise behind every 250."""

from __future__ import annotations

import os
import signal
import smtplib
import threading
from collections.abc import Callable

import pytest

from common.jobqueue import QueuedJob
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, message
from tests.integration.eventually import GENEROUS
from tests.queuediag import describe_stuck
from tests.redisserver import RedisServer
from tests.sinks import SinkServer, wait_for


def test_redis_sigkill_after_250_loses_nothing(redis_server: RedisServer, mta_factory: Callable[..., MTA]) -> None:
    """appendfsync always: a 250 means the AOF has it, so SIGKILL right after loses nothing."""
    mta = mta_factory()
    mta.start_ingress()
    accepted: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
            for i in range(20):
                s.ehlo_or_helo_if_needed()
                s.mail("alice@client.test")
                s.rcpt(f"u{n}.{i}@a.test")
                code, resp = s.data(message(f"m{n}.{i}"))
                assert code == 250, resp
                with lock:
                    accepted.append(resp.decode().rsplit(" ", 1)[-1])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    redis_server.kill()
    redis_server.start()
    assert len(accepted) == 100
    missing = [q for q in accepted if mta.store.load(q) is None]
    assert missing == []
    assert mta.store.queue_size() == 100
    # and their delivery came back with them: every accepted message is in its destination's
    # pending list, once, and the drain job that will take it is queued (common/jobqueue.py)
    assert sorted(mta.queue.pending_ids("a.test")) == sorted(accepted)
    assert mta.queue.pending() == 100
    [job] = mta.queue.rq.get_jobs()
    assert QueuedJob.of(job).destination == "a.test" and mta.queue.armed() == {"a.test": job.id}
    assert mta.queue.counts().waiting == 1


def test_ingress_sigkill_mid_data_stores_nothing_half(
    zone: ZoneServer, redis_server: RedisServer, mta_factory: Callable[..., MTA]
) -> None:
    mta = mta_factory()
    mta.start_ingress()
    first = mta.send("alice@client.test", ["bob@a.test"], message("before"))
    s = smtplib.SMTP("127.0.0.1", mta.port, timeout=10)
    s.ehlo()
    s.mail("alice@client.test")
    s.rcpt("bob@a.test")
    s.putcmd("data")
    assert s.getreply()[0] == 354
    s.send(b"Subject: half\r\n\r\nsome of the body\r\n")
    os.kill(mta.procs["ingress"].pid, signal.SIGKILL)
    mta.procs["ingress"].wait(10)
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError, OSError)):
        s.send(b".\r\n")
        s.getreply()
    s.close()
    assert mta.store.queue_ids() == [first]
    mta.start_ingress()
    assert mta.send("alice@client.test", ["bob@a.test"], message("after"))


@pytest.mark.slow
def test_worker_sigkill_mid_delivery_is_rerun(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    """A worker killed while the remote is answering DATA: RQ finds the job abandoned once its
    heartbeat lapses (job_timeout + 60 s), re-runs it, and the message is delivered (at least once)."""
    box = sinks("127.0.0.2")
    box.data_delay = 3.0
    mta = mta_factory(job_timeout=5, maintenance_interval=3)
    mta.start_ingress()
    mta.start_worker()
    qid = mta.send("alice@client.test", ["bob@a.test"], message("crash"))
    assert wait_for(lambda: box.attempts >= 1, GENEROUS), mta.logs()
    os.kill(mta.procs["worker0"].pid, signal.SIGKILL)
    mta.procs.pop("worker0").wait(10)
    box.data_delay = 0.0
    mta.start_worker()
    assert wait_for(lambda: mta.store.queue_size() == 0, 150), describe_stuck(mta.redis, mta.logs())
    assert box.messages and all(b"Subject: crash" in m[2] for m in box.messages)
    assert f"{qid}: to=<bob@a.test>" in mta.logs() and "status=sent" in mta.logs()
