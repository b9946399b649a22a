"""The outcome journal across processes (worker/journal.py): real ingress and worker processes, a
real redis-server, DNS on loopback and an aiosmtpd MX. A worker killed after the remote's 250,
before Redis had its outcome, leaves a journal that the next worker on the host records; and a
journal a dead process left keeps its messages from being sent again."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.envelope import RcptState, RecipientStatus
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, message, route
from tests.integration.eventually import GENEROUS
from tests.redisserver import RedisServer
from tests.sinks import SinkServer, wait_for
from tests.tcprelay import TcpRelay, Verdict
from worker.journal import SUFFIX, encode

SENDER = "app@client.test"


# what a worker's outcome write carries for a delivered recipient (RecipientStatus.to_json)
DELIVERED_STATUS = b'"s":"delivered"'


class Freezer(TcpRelay):
    """127.0.0.1:<port> -> Redis, relaying both ways until a client sends DELIVERED_STATUS: from then
    on (that write included) what the clients send is dropped, as if the worker had died first."""

    def __init__(self, target_port: int) -> None:
        self.frozen = threading.Event()
        super().__init__(target_port)

    def verdict(self, data: bytes, up: bool, state: dict[str, object]) -> Verdict:
        if up and DELIVERED_STATUS in data:
            self.frozen.set()
        return Verdict.DROP if up and self.frozen.is_set() else Verdict.FORWARD


@pytest.fixture
def freezer(redis_server: RedisServer) -> Iterator[Freezer]:
    with Freezer(redis_server.port) as relay:
        yield relay


def _journals(mta: MTA) -> list[Path]:
    return sorted((Path(mta.env["MTAQ_DATA_DIR"]) / "journal").glob(f"*{SUFFIX}"))


def test_a_worker_killed_before_redis_had_its_outcome_leaves_it_to_the_next_worker(
    dns: ZoneServer,
    redis_server: RedisServer,
    sinks: Callable[..., SinkServer],
    mta_factory: Callable[..., MTA],
    freezer: Freezer,
) -> None:
    route(dns, "a.test", "127.0.0.2")
    box = sinks("127.0.0.2")
    mta = mta_factory()
    mta.start_ingress()
    qid = mta.send(SENDER, ["bob@a.test"], message("journal"))
    direct = mta.env["MTAQ_REDIS_URL"]
    mta.env["MTAQ_REDIS_URL"] = f"redis://127.0.0.1:{freezer.port}/0"
    mta.start_worker()  # worker0, through the freezer
    mta.env["MTAQ_REDIS_URL"] = direct
    assert wait_for(freezer.frozen.is_set, GENEROUS), mta.logs()  # its outcome write, dropped
    assert f"{qid}: to=<bob@a.test>" in mta.logs() and len(box.messages) == 1
    [journal] = _journals(mta)
    assert qid.encode() in journal.read_bytes()  # in the journal, not in Redis:
    assert not mta.store.statuses(qid)[0].final
    p = mta.procs.pop("worker0")
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)

    mta._spawn("worker1", "worker")  # the next worker on the host: straight to Redis
    assert wait_for(lambda: 0 in mta.store.statuses(qid) and mta.store.statuses(qid)[0].final, GENEROUS), mta.logs()
    st = mta.store.statuses(qid)[0]
    assert st.state is RcptState.DELIVERED and st.reply.startswith("250")
    assert wait_for(lambda: "adopted 1 outcome(s) of a stopped worker process" in mta.logs(), GENEROUS)
    assert wait_for(lambda: journal not in _journals(mta), GENEROUS)
    assert len(box.messages) == 1


def test_messages_a_dead_processs_journal_says_delivered_are_finished_not_sent_again(
    dns: ZoneServer,
    sinks: Callable[..., SinkServer],
    mta_factory: Callable[..., MTA],
) -> None:
    route(dns, "a.test", "127.0.0.2")
    box = sinks("127.0.0.2")
    mta = mta_factory()
    mta.start_ingress()
    ids = [mta.send(SENDER, [f"u{n}@a.test"], message(f"j{n}")) for n in range(3)]
    # what a worker killed after their 250s left on this host (the statuses its writes carried)
    status = RecipientStatus(RcptState.DELIVERED, 1, "2.0.0", "250 2.0.0 Ok: queued", "sink-127.0.0.2[127.0.0.2]")
    journal_dir = Path(mta.env["MTAQ_DATA_DIR"]) / "journal"
    journal_dir.mkdir(parents=True)
    (journal_dir / f"host-1-dead{SUFFIX}").write_bytes(b"".join(encode([(q, 0, status)]) for q in ids))
    mta.start_worker()
    assert wait_for(lambda: mta.store.queue_size() == 0, GENEROUS), mta.logs()
    assert box.messages == []  # finished from their statuses, none sent
    assert wait_for(lambda: "adopted 3 outcome(s) of a stopped worker process" in mta.logs(), GENEROUS)
    assert [p.name for p in _journals(mta) if "dead" in p.name] == []
