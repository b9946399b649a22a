"""The worker's outcome writer (group commit of final outcomes) and the finish without a claim:
real redis-server, DNS server and sinks; the job function runs in this process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.settings import Settings
from common.spool import Spool
from common.store import Message, Store
from tests.dnsserver import ZoneServer
from tests.fixtures import route
from tests.redisserver import RedisServer
from tests.sinks import SinkServer
from worker import jobs
from worker.service import DeliveryService

BODY = b"From: alice@client.test\r\nSubject: writer\r\n\r\nhello\r\n"


@pytest.fixture
def ctx(redis_server: RedisServer, dns: ZoneServer, mx_port: int) -> Iterator[DeliveryService]:
    route(dns, "a.test", "127.0.0.2")
    route(dns, "client.test", "127.0.0.9")
    settings = Settings(
        hostname="mtaq.test",
        redis_url=redis_server.url,
        dns_servers=f"127.0.0.1:{dns.port}",
        smtp_port=mx_port,
        smtp_timeout=5,
        job_timeout=30,
        connect_timeout=2,
    )
    c = jobs.make_service(settings, Spool.from_settings(settings, redis.Redis.from_url(redis_server.url)))
    jobs.install(c)
    yield c
    jobs.install(None)


def queue(ctx: DeliveryService, n: int, *rcpts: Recipient) -> list[str]:
    msgs = [
        Message(Envelope(id=f"Q{time.time_ns()}{i}", sender="alice@client.test", recipients=list(rcpts)), BODY)
        for i in range(n)
    ]
    ctx.spool.commit(msgs)
    ctx.spool.queue.empty()  # the tests decide what runs
    return [m.envelope.id for m in msgs]


def test_many_messages_share_the_writers_round_trips_and_leave_no_key_behind(
    ctx: DeliveryService, sinks: Callable[..., SinkServer]
) -> None:
    mx = sinks("127.0.0.2")
    writes: list[int] = []
    real = ctx.store.set_status_list

    def counted(entries: Sequence[tuple[str, int, RecipientStatus]], **kw: Any) -> list[int]:
        writes.append(len(entries))
        return real(entries, **kw)

    ctx.store.set_status_list = counted  # type: ignore[method-assign]
    ids = queue(ctx, 30, Recipient("bob@a.test"))
    jobs.deliver("a.test", ids)
    assert len(mx.messages) == 30
    assert sum(writes) == 30  # every outcome written once, before the job finished
    # nothing left: no message, no lease, no finish claim (no DSN was due)
    left = [k.decode() if isinstance(k, bytes) else k for k in ctx.store.redis.keys("mtaq:*")]
    # but the deployment's counters: the queue's (issue 16) all back at 0, the emptied
    # destination left in their set until a sweep (readers skip it); and the events stream, which
    # outlives the mail it reports
    assert sorted(k for k in left if not k.startswith("mtaq:dest:")) == [
        "mtaq:events",
        "mtaq:queue:counts",
        "mtaq:queue:dests",
        "mtaq:queue:dests-gen",
        "mtaq:stats",
    ]
    assert {int(v) for v in ctx.store.redis.hvals("mtaq:queue:counts")} == {0}


def test_a_dsn_due_is_still_claimed_and_built_once(ctx: DeliveryService, sinks: Callable[..., SinkServer]) -> None:
    sinks("127.0.0.2")
    [qid] = queue(ctx, 1, Recipient("bob@a.test", notify=("SUCCESS",)))
    jobs.deliver("a.test", [qid])
    [dsn_id] = ctx.store.queue_ids()
    dsn = ctx.store.load(dsn_id)
    assert dsn is not None and b"Action: relayed" in dsn.body
    assert ctx.store.redis.exists(f"mtaq:lease:{qid}:finish") == 1  # the claim, lapsing with FINISH_CLAIM


def test_an_outcome_that_cannot_be_written_fails_the_job_and_frees_the_lease(
    ctx: DeliveryService, sinks: Callable[..., SinkServer]
) -> None:
    sinks("127.0.0.2")

    def refused(entries: Sequence[tuple[str, int, RecipientStatus]], **kw: Any) -> list[int]:
        raise redis.ResponseError("refused")

    ctx.store.set_status_list = refused  # type: ignore[method-assign]
    [qid] = queue(ctx, 1, Recipient("bob@a.test"))
    with pytest.raises(redis.ResponseError):
        jobs.deliver("a.test", [qid])  # RQ runs it again: the message is sent again (at least once)
    assert Store(ctx.store.redis).statuses(qid)[0].state is RcptState.PENDING
    assert not ctx.store.redis.exists("mtaq:leases:a.test") and not ctx.store.redis.keys("mtaq:holder:*")
