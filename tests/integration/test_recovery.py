"""What the jobs do when the queue is not as they left it: interrupted finishing, lost jobs, a
changed relayhost, recipients not due yet, a sender that needs SMTPUTF8. Real redis-server, DNS
server and sinks; the job function runs in this process."""

from __future__ import annotations

import email
import email.policy
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.leasebook import LeaseBook
from common.settings import Settings
from common.spool import Spool
from common.store import Message
from tests.dnsserver import ZoneServer
from tests.fixtures import route
from tests.ports import ipv6_loopback
from tests.redisserver import RedisServer
from tests.sinks import SinkServer
from worker import jobs
from worker.finisher import Finisher
from worker.service import DeliveryService
from worker.sweep import SweepReport, sweep

SENDER = "alice@client.test"


def swept(ctx: DeliveryService, now: float | None = None) -> SweepReport:
    """The sweep as `mtaq queue sweep` runs it: its own Finisher on the queue's storage."""
    return sweep(ctx.spool, Finisher.from_settings(ctx.settings, ctx.spool), ctx.settings.job_timeout, now)


BODY = b"From: alice@client.test\r\nSubject: recovery\r\n\r\nhello\r\n"


@pytest.fixture
def ctx_factory(redis_server: RedisServer, zone: ZoneServer, mx_port: int) -> Iterator[Callable[..., DeliveryService]]:
    def make(**overrides: object) -> DeliveryService:
        base: dict[str, object] = {"smtp_timeout": 5, "job_timeout": 30, "connect_timeout": 2}
        settings = Settings(
            hostname="mtaq.test",
            redis_url=redis_server.url,
            dns_servers=f"127.0.0.1:{zone.port}",
            smtp_port=mx_port,
            **{**base, **overrides},  # type: ignore[arg-type]
        )
        ctx = jobs.make_service(settings, Spool.from_settings(settings, redis.Redis.from_url(redis_server.url)))
        jobs.install(ctx)
        return ctx

    yield make
    jobs.install(None)


def queue(
    ctx: DeliveryService, *rcpts: str, sender: str = SENDER, received_at: float | None = None, smtputf8: bool = False
) -> str:
    env = Envelope(
        id=f"Q{time.time_ns()}",
        sender=sender,
        recipients=[Recipient(r) for r in rcpts],
        received_at=received_at or time.time(),
        smtputf8=smtputf8,
    )
    ctx.spool.commit([Message(env, BODY)])
    ctx.spool.queue.empty()  # the job is "lost": the tests decide what runs
    return env.id


def test_a_rerun_job_finishes_a_message_whose_finishing_was_interrupted(
    ctx_factory: Callable[..., DeliveryService], sinks: Callable[..., SinkServer]
) -> None:
    home = sinks("127.0.0.9")
    ctx = ctx_factory()
    qid = queue(ctx, "bad@a.test")
    # the recipient bounced and was recorded, then the worker died before the DSN and the delete
    assert ctx.store.set_statuses(
        {qid: {0: RecipientStatus(RcptState.BOUNCED, 1, "5.1.1", "550 5.1.1 no", updated=time.time())}}
    ) == {qid: [0]}
    jobs.deliver("a.test", [qid])  # RQ re-runs the job
    assert ctx.store.load(qid) is None
    [dsn_id] = ctx.store.queue_ids()
    dsn = ctx.store.load(dsn_id)
    assert dsn is not None and dsn.envelope.sender == "" and b"Action: failed" in dsn.body
    jobs.deliver("client.test", [dsn_id])
    assert len(home.messages) == 1


def test_sweep_finishes_left_behind_messages_once_settled(ctx_factory: Callable[..., DeliveryService]) -> None:
    ctx = ctx_factory()
    qid = queue(ctx, "bad@a.test")
    ctx.store.set_statuses({qid: {0: RecipientStatus(RcptState.BOUNCED, 1, "5.1.1", "550 no", updated=time.time())}})
    assert swept(ctx).finished == 0  # a job may be finishing it right now
    report = swept(ctx, now=time.time() + 120)
    assert report.finished == 1 and ctx.store.load(qid) is None
    assert len(ctx.store.queue_ids()) == 1  # its DSN, once
    assert swept(ctx, now=time.time() + 240).finished == 0


def test_sweep_requeues_recipients_whose_job_is_gone(
    ctx_factory: Callable[..., DeliveryService], sinks: Callable[..., SinkServer]
) -> None:
    box = sinks("127.0.0.2")
    ctx = ctx_factory()
    fresh = queue(ctx, "new@a.test")
    old = queue(ctx, "old@a.test", received_at=time.time() - 1000)  # queued longer than a job lives
    report = swept(ctx)
    assert report.requeued == 1
    [job] = ctx.spool.queue.rq.get_jobs()
    assert list(job.args) == ["a.test", [old], False]
    jobs.deliver(*job.args)
    assert [m[1] for m in box.messages] == [["old@a.test"]]
    assert ctx.store.load(old) is None and ctx.store.load(fresh) is not None


def test_recipients_not_due_are_left_to_their_retry_unless_flushed(
    ctx_factory: Callable[..., DeliveryService], sinks: Callable[..., SinkServer]
) -> None:
    box = sinks("127.0.0.2")
    ctx = ctx_factory()
    qid = queue(ctx, "later@a.test")
    ctx.store.set_statuses(
        {
            qid: {
                0: RecipientStatus(
                    RcptState.DEFERRED, 1, "4.0.0", "451 later", updated=time.time(), next_attempt=time.time() + 300
                )
            }
        }
    )
    jobs.deliver("a.test", [qid])  # a duplicate job (a second chain): nothing to do yet
    assert box.attempts == 0
    jobs.deliver("a.test", [qid], True)  # mtaq queue flush
    assert box.attempts == 1 and ctx.store.load(qid) is None


def test_a_leased_message_is_left_to_the_job_holding_it(
    ctx_factory: Callable[..., DeliveryService], sinks: Callable[..., SinkServer]
) -> None:
    box = sinks("127.0.0.2")
    ctx = ctx_factory()
    qid = queue(ctx, "bob@a.test")
    book = LeaseBook(ctx.store.redis)
    assert book.take([qid], "a.test", "other-job", 30) == [qid]
    jobs.deliver("a.test", [qid])
    assert box.attempts == 0 and ctx.store.load(qid) is not None
    book.end([qid], "a.test", "other-job")
    jobs.deliver("a.test", [qid])
    assert [m[1] for m in box.messages] == [["bob@a.test"]]


def test_jobs_queued_before_a_relayhost_change_follow_the_relayhost(
    ctx_factory: Callable[..., DeliveryService], sinks: Callable[..., SinkServer], mx_port: int
) -> None:
    smart = sinks("127.0.0.5")
    ctx = ctx_factory()
    qid = queue(ctx, "bob@a.test")  # queued for a.test
    ctx = ctx_factory(relayhost=f"[127.0.0.5]:{mx_port}")
    jobs.deliver("a.test", [qid])
    [job] = ctx.spool.queue.rq.get_jobs()
    assert job.args[0] == f"[127.0.0.5]:{mx_port}"
    jobs.deliver(*job.args)
    assert [m[1] for m in smart.messages] == [["bob@a.test"]]


def test_a_bounce_to_a_utf8_sender_goes_with_smtputf8(
    ctx_factory: Callable[..., DeliveryService], sinks: Callable[..., SinkServer]
) -> None:
    box = sinks("127.0.0.2")
    box.rcpt_replies["bad@a.test"] = "550 5.1.1 User unknown"
    home = sinks("127.0.0.9", smtputf8=True)
    ctx = ctx_factory()
    qid = queue(ctx, "bad@a.test", sender="ålice@client.test", smtputf8=True)
    jobs.deliver("a.test", [qid])
    [dsn_id] = ctx.store.queue_ids()
    jobs.deliver("client.test", [dsn_id])
    [delivery] = home.deliveries
    assert delivery.rcpt_tos == ["ålice@client.test"] and "SMTPUTF8" in delivery.mail_options
    report = email.message_from_bytes(delivery.data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert ctx.store.queue_ids() == []


def test_a_utf8_address_to_a_server_without_smtputf8_bounces_alone(
    ctx_factory: Callable[..., DeliveryService], sinks: Callable[..., SinkServer]
) -> None:
    box = sinks("127.0.0.2")  # no SMTPUTF8
    ctx = ctx_factory()
    bad = queue(ctx, "bøb@a.test", smtputf8=True)
    good = queue(ctx, "bob@a.test")
    jobs.deliver("a.test", [bad, good])
    assert [m[1] for m in box.messages] == [["bob@a.test"]]
    assert ctx.store.load(bad) is None and ctx.store.load(good) is None
    [dsn_id] = ctx.store.queue_ids()
    dsn = ctx.store.load(dsn_id)
    assert dsn is not None and b"Status: 5.6.7" in dsn.body


def test_a_client_error_defers_and_drops_the_connection_without_failing_the_job(
    ctx_factory: Callable[..., DeliveryService], sinks: Callable[..., SinkServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.smtpclient import SMTPConnection

    box = sinks("127.0.0.2")
    ctx = ctx_factory(destination_concurrency=1)  # one conversation: the second message waits for it
    first = queue(ctx, "one@a.test")
    second = queue(ctx, "two@a.test")
    real_send = SMTPConnection.send

    def broken(self: SMTPConnection, sender: str, rcpts: list[str], body: bytes, **kw: object) -> object:
        if rcpts == ["one@a.test"]:
            raise RuntimeError("a bug")
        return real_send(self, sender, rcpts, body, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(SMTPConnection, "send", broken)
    jobs.deliver("a.test", [first, second])  # returns: RQ does not see a failed job
    st = ctx.store.statuses(first)[0]
    assert st.state is RcptState.DEFERRED and st.next_attempt > time.time() and st.dsn == "4.3.0"
    # the connection in an unknown state was dropped; the second message went on a new one
    assert [m[1] for m in box.messages] == [["two@a.test"]] and box.connections >= 2
    assert len(ctx.spool.queue.rq.scheduled_job_registry.get_job_ids()) == 1  # the retry of the first


def test_a_remote_that_stops_answering_is_reported_as_timed_out(
    ctx_factory: Callable[..., DeliveryService], sinks: Callable[..., SinkServer]
) -> None:
    box = sinks("127.0.0.2")
    box.data_delay = 3.0
    ctx = ctx_factory(smtp_timeout=1)
    qid = queue(ctx, "bob@a.test")
    jobs.deliver("a.test", [qid])
    st = ctx.store.statuses(qid)[0]
    assert st.state is RcptState.DEFERRED and st.dsn == "4.4.2"
    assert st.reply.startswith("conversation with mx.a.test[127.0.0.2]") and "timed out while sending" in st.reply


def test_an_mx_on_the_address_we_listen_on_bounces_as_a_loop(
    ctx_factory: Callable[..., DeliveryService], zone: ZoneServer, sinks: Callable[..., SinkServer]
) -> None:
    """The worker knows the address the ingress listens on (the `listen` setting): mail whose MX
    resolves to it would come back to us, so it bounces 5.4.6 instead of looping."""
    sinks("127.0.0.9")  # the sender's domain, for the DSN
    route(zone, "loops.test", "127.0.0.1")
    ctx = ctx_factory(listen="127.0.0.1:2525")
    qid = queue(ctx, "bob@loops.test")
    jobs.deliver("loops.test", [qid])
    assert ctx.store.load(qid) is None
    [dsn_id] = ctx.store.queue_ids()
    dsn = ctx.store.load(dsn_id)
    assert dsn is not None and b"Status: 5.4.6" in dsn.body


def test_an_mx_with_only_an_ipv6_address_gets_the_mail_over_ipv6(
    ctx_factory: Callable[..., DeliveryService], zone: ZoneServer, mx_port: int
) -> None:
    zone.add("v6.test.", "MX", "10 mx.v6.test.")
    zone.add("mx.v6.test.", "AAAA", "::1")
    if not ipv6_loopback():  # only the address family missing skips; an address in use fails
        pytest.skip("no IPv6 loopback (::1) on this host")
    box = SinkServer("::1", mx_port).start()
    try:
        ctx = ctx_factory()
        qid = queue(ctx, "bob@v6.test")
        jobs.deliver("v6.test", [qid])
        assert [m[1] for m in box.messages] == [["bob@v6.test"]]
        assert ctx.store.load(qid) is None
    finally:
        box.stop()
