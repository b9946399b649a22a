"""Delay warnings (worker/delays.py) on a fake Redis, with the clock passed in: due after
delay_warning, once per message whoever asks, never for mail from <>, never when off."""

from __future__ import annotations

import email
import email.policy
import pathlib

import fakeredis
import pytest

from common.dkimkeys import KeyTable
from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.jobqueue import DeliveryQueue
from common.routing import Router
from common.settings import Settings
from common.spool import Spool
from common.store import Message, Store, msg_key
from tests.dkimkeys import dkimpy_verify, write_table
from worker.delays import warn_delayed
from worker.signing import ReportSigner

T0 = 1_700_000_000.0
DEFERRED = RecipientStatus(RcptState.DEFERRED, 1, "4.4.1", "451 4.4.1 later", "mx[127.0.0.2]:25", "mx", T0)


@pytest.fixture
def spool() -> Spool:
    r = fakeredis.FakeRedis()
    return Spool(Store(r), DeliveryQueue(r, "mtaq"), Router())


@pytest.fixture
def store(spool: Spool) -> Store:
    return spool.store


def settings(delay_warning: float = 14400.0) -> Settings:
    return Settings(hostname="mtaq.test", delay_warning=delay_warning, queue_lifetime=86400.0)


def queued(spool: Spool, qid: str = "Q1", sender: str = "a@x.test", notify: tuple[str, ...] = ()) -> Message:
    rcpts = [Recipient("slow@y.test", notify=notify)]
    env = Envelope(id=qid, sender=sender, recipients=rcpts, received_at=T0, protocol="ESMTP")
    m = Message(env, b"Subject: s\r\n\r\nbody\r\n")
    spool.commit([m])
    return m


def reports(store: Store) -> list[Message]:
    """The reports queued: our own mail, from <> (a queued bounce from a client is "ESMTP")."""
    found = store.load_many(store.queue_ids())
    return [f[0] for f in found if f is not None and f[0].envelope.protocol == "local"]


def test_one_warning_after_delay_warning_and_never_a_second(spool: Spool, store: Store) -> None:
    m = queued(spool)
    s = settings()
    assert warn_delayed(spool, s, [(m, {0: DEFERRED})], T0 + 14399) == []  # not yet
    assert reports(store) == []
    assert warn_delayed(spool, s, [(m, {0: DEFERRED})], T0 + 14400) == ["Q1"]
    assert warn_delayed(spool, s, [(m, {0: DEFERRED})], T0 + 20000) == []  # later deferrals: no more
    assert warn_delayed(spool, s, [(m, {0: DEFERRED})], T0 + 30000) == []
    [report] = reports(store)
    assert [r.address for r in report.envelope.recipients] == ["a@x.test"]
    parsed = email.message_from_bytes(report.body, policy=email.policy.default)
    assert parsed["Subject"] == "Delayed Mail (still being retried)"
    assert b"Action: delayed" in report.body and b"Will-Retry-Until: " in report.body
    assert store.redis.hexists(msg_key("Q1"), "warned")


def test_two_workers_racing_send_one_warning(spool: Spool, store: Store) -> None:
    m = queued(spool)
    first = warn_delayed(spool, settings(), [(m, {0: DEFERRED})], T0 + 15000)
    second = warn_delayed(spool, settings(), [(m, {0: DEFERRED})], T0 + 15000)
    assert first + second == ["Q1"] and len(reports(store)) == 1


def test_no_warning_when_off_for_bounces_or_for_who_did_not_ask(spool: Spool, store: Store) -> None:
    off = queued(spool, "Q1")
    bounce = queued(spool, "Q2", sender="")
    quiet = queued(spool, "Q3", notify=("FAILURE",))
    assert warn_delayed(spool, settings(delay_warning=0.0), [(off, {0: DEFERRED})], T0 + 10**6) == []
    assert warn_delayed(spool, settings(), [(bounce, {0: DEFERRED}), (quiet, {0: DEFERRED})], T0 + 10**6) == []
    assert reports(store) == []


def test_a_finished_message_is_not_warned_about(spool: Spool, store: Store) -> None:
    m = queued(spool)
    store.delete("Q1")
    assert warn_delayed(spool, settings(), [(m, {0: DEFERRED})], T0 + 15000) == []
    assert not store.redis.exists(msg_key("Q1"))  # the claim did not bring the hash back


def test_negative_delay_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="delay_warning"):
        Settings(hostname="h.test", delay_warning=-1.0)
    with pytest.raises(ValueError, match="bounce_lifetime"):
        Settings(hostname="h.test", bounce_lifetime=-1.0)
    assert Settings(hostname="h.test").delay_warning == 0.0  # off unless set


def test_the_warning_writes_one_delayed_event_per_recipient_named(spool: Spool) -> None:
    from common.events import EventType, parse_entries
    from common.store import EVENTS

    events_spool = Spool(Store(spool.store.redis, events_max=1000), spool.queue, spool.router)
    m = queued(events_spool)
    warn_delayed(events_spool, settings(), [(m, {0: DEFERRED})], T0 + 14400)
    warn_delayed(events_spool, settings(), [(m, {0: DEFERRED})], T0 + 20000)  # no second warning, no event
    [(_, ev)] = parse_entries(events_spool.store.redis.xrange(EVENTS))
    assert (ev.type, ev.id, ev.recipient, ev.time) == (EventType.DELAYED, "Q1.0.delayed", "slow@y.test", T0 + 14400)
    assert (ev.dsn, ev.attempt, ev.classification) == ("4.4.1", 1, "ConnectionFailure")


def test_the_warning_is_signed_when_a_key_covers_the_hostname(
    spool: Spool, store: Store, tmp_path: pathlib.Path
) -> None:
    table, keys = write_table(tmp_path, [("mtaq.test", "dsn", "ed25519")])
    sign = ReportSigner(KeyTable(str(table)))
    m = queued(spool)
    assert warn_delayed(spool, settings(), [(m, {0: DEFERRED})], T0 + 14400, sign=sign) == ["Q1"]
    (report,) = reports(store)
    assert report.body.startswith(b"DKIM-Signature:") and dkimpy_verify(report.body, keys)
