"""Delivery events (common/events.py): serialisation both ways, ids, types, the webhook signature,
and their writing with the state change (common/store.py, fakeredis with Lua)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from typing import Any

import fakeredis
import pytest

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.events import (
    Event,
    EventType,
    delayed_event,
    message_id_of,
    outcome_event,
    outcome_type,
    parse_entries,
    receptions,
    sign,
    signature_ok,
    suppressed_event,
)
from common.store import EVENTS, Message, Store

ENV = Envelope(id="ABC123", sender="app@client.test", recipients=[Recipient("a@x.test"), Recipient("b@y.test")])
BODY = b"From: app@client.test\r\nMessage-ID:\r\n <m1@client.test>\r\nSubject: hi\r\n\r\nMessage-ID: <not@body>\r\n"


def test_message_id_is_read_from_the_header_only_and_unfolded() -> None:
    assert message_id_of(BODY) == "<m1@client.test>"
    assert message_id_of(b"Subject: x\r\n\r\nMessage-ID: <in@body>\r\n") == ""
    assert message_id_of(b"message-id: <lf@only>\nSubject: y\n\nbody") == "<lf@only>"


def test_message_id_only_where_a_field_starts_and_the_first_of_several() -> None:
    assert message_id_of(b"X-Message-ID: <no>\r\nX: Message-ID: <no>\r\nMESSAGE-ID:  <yes> \r\n\r\n") == "<yes>"
    assert message_id_of(b"Message-ID: <a@x>\r\nMessage-ID: <b@x>\r\n\r\n") == "<a@x>"
    assert message_id_of(b"A: b\r\nMessage-ID:\r\n\t<f@x>\r\n more\r\n\r\nbody") == "<f@x> more"
    assert message_id_of(b"A: b\n\nMessage-ID: <after@blank>\r\n\r\n") == ""  # a bare-LF empty line ends it
    assert message_id_of(b"Message-ID: <no@end>") == "<no@end>"
    assert message_id_of(b"") == ""


def test_reception_events_one_per_recipient_with_stable_ids() -> None:
    evs = receptions([(ENV, BODY)], 1000.5)
    assert [e.recipient for e in evs] == ["a@x.test", "b@y.test"]
    assert [e.id for e in evs] == ["ABC123.0.reception", "ABC123.1.reception"]
    assert all(e.type is EventType.RECEPTION and e.message_id == "<m1@client.test>" for e in evs)


@pytest.mark.parametrize(
    ("state", "dsn", "kind", "klass"),
    [
        (RcptState.DELIVERED, "2.0.0", EventType.DELIVERY, ""),
        (RcptState.DEFERRED, "4.2.2", EventType.TRANSIENT, "MailboxFull"),
        (RcptState.BOUNCED, "5.1.1", EventType.BOUNCE, "InvalidRecipient"),
        (RcptState.BOUNCED, "4.4.1", EventType.EXPIRATION, "ConnectionFailure"),
    ],
)
def test_outcome_events(state: RcptState, dsn: str, kind: EventType, klass: str) -> None:
    st = RecipientStatus(state, attempts=3, dsn=dsn, reply="host mx[192.0.2.1]:25 said: whatever", relay="mx")
    assert outcome_type(st) is kind
    ev = outcome_event(ENV, 1, st, "<m1@client.test>")
    assert (ev.type, ev.recipient, ev.attempt, ev.classification) == (kind, "b@y.test", 3, klass)
    assert ev.id == f"ABC123.1.{kind.value}.3"


def test_an_outcome_event_carries_the_attempts_tls() -> None:
    tls = "verified(mta-sts) TLSv1.3 TLS_AES_256_GCM_SHA384"
    st = RecipientStatus(RcptState.DELIVERED, 1, "2.0.0", "250 2.0.0 Ok", "mx", tls=tls)
    assert outcome_event(ENV, 0, st, "<m>").tls == tls
    assert delayed_event(ENV, 0, dataclasses.replace(st, state=RcptState.DEFERRED), "<m>", 1.0).tls == tls


def test_fields_round_trip_and_json_form() -> None:
    ev = outcome_event(
        ENV, 0, RecipientStatus(RcptState.BOUNCED, 1, "5.1.1", "550 5.1.1 no such user", "mx", updated=12.25), "<m>"
    )
    fields = ev.to_fields()
    assert set(fields) == {
        "id", "type", "time", "queue_id", "message_id", "sender", "recipient", "relay", "dsn", "reply", "tls",
        "attempt", "classification",
    }  # fmt: skip
    assert all(isinstance(v, str) for v in fields.values()) and fields["tls"] == ""
    assert Event.from_fields({k.encode(): v.encode() for k, v in fields.items()}) == ev
    obj = ev.to_json_obj()
    assert obj["time"] == 12.25 and obj["attempt"] == 1 and obj["type"] == "bounce"
    assert json.loads(json.dumps(obj)) == obj


def test_suppressed_events_have_unique_ids() -> None:
    a, b = (suppressed_event("s@x", "r@y", "550 ...", 1.0) for _ in range(2))
    assert a.id != b.id and a.type is EventType.SUPPRESSED and a.queue_id == ""


def test_signature_is_hmac_sha256_of_the_body() -> None:
    body = b'[{"id":"1"}]'
    expected = hmac.new(b"k3y", body, hashlib.sha256).hexdigest()
    assert sign(b"k3y", body) == "sha256=" + expected
    assert signature_ok(b"k3y", body, "sha256=" + expected)
    assert not signature_ok(b"k3y", body + b" ", "sha256=" + expected)
    assert not signature_ok(b"other", body, "sha256=" + expected)


def _stream(store: Store) -> list[Event]:
    return [ev for _, ev in parse_entries(store.redis.xrange(EVENTS))]


def test_commit_writes_events_in_its_transaction_and_only_when_on() -> None:
    r = fakeredis.FakeRedis()
    Store(r).commit([Message(ENV, BODY)], events=receptions([(ENV, BODY)], 1.0))
    assert r.xlen(EVENTS) == 0  # events_max 0: off
    store = Store(r, events_max=1000)
    env2 = Envelope(id="DEF", sender="", recipients=[Recipient("c@z.test")])
    store.commit([Message(env2, BODY)], events=receptions([(env2, BODY)], 2.0))
    assert [e.id for e in _stream(store)] == ["DEF.0.reception"]


def test_outcome_event_is_written_exactly_when_the_state_is() -> None:
    r = fakeredis.FakeRedis()
    store = Store(r, events_max=1000)
    store.commit([Message(ENV, BODY)])
    st = RecipientStatus(RcptState.DELIVERED, 1, "2.0.0", "250 ok", "mx", updated=5.0)
    ev = outcome_event(ENV, 0, st, "<m>")
    assert store.set_status_list([("ABC123", 0, st)], events=[ev]) == [1]
    # a job run again after a crash: the final state stays, and no second event
    assert store.set_status_list([("ABC123", 0, st)], events=[ev]) == [-1]
    assert _stream(store) == [ev]
    # an entry without an event (None) writes only the state
    deferred = RecipientStatus(RcptState.DEFERRED, 1, "4.0.0", "451 later", "mx")
    assert store.set_status_list([("ABC123", 1, deferred)], events=[None]) == [-3]
    assert len(_stream(store)) == 1


def test_one_write_is_one_entry_and_an_older_mtaqs_entries_still_read() -> None:
    """A group commit's receptions and an outcome writer's call are one stream entry each (issue
    15: one XADD a write); an entry of one event in string fields (an older mtaq's) reads too."""
    r = fakeredis.FakeRedis()
    store = Store(r, events_max=1000)
    old = Event(id="OLD.0.delivery.1", type=EventType.DELIVERY, time=0.5, queue_id="OLD", attempt=1)
    fields: dict[Any, Any] = dict(old.to_fields())
    r.xadd(EVENTS, fields)
    store.commit([Message(ENV, BODY)], events=receptions([(ENV, BODY)], 1.0))
    assert r.xlen(EVENTS) == 2
    done = RecipientStatus(RcptState.DELIVERED, 1, "2.0.0", "250 ok", "mx", updated=5.0)
    evs: list[Event | None] = [outcome_event(ENV, i, done, "<m1@client.test>") for i in (0, 1)]
    assert store.set_status_list([("ABC123", 0, done), ("ABC123", 1, done)], events=evs) == [1, 0]
    assert r.xlen(EVENTS) == 3
    got = parse_entries(r.xrange(EVENTS))
    assert [ev.id for _, ev in got] == [
        "OLD.0.delivery.1", "ABC123.0.reception", "ABC123.1.reception", "ABC123.0.delivery.1", "ABC123.1.delivery.1"
    ]  # fmt: skip
    assert [ev for _, ev in got[3:]] == evs and got[0][1] == old
    assert len({sid for sid, _ in got}) == 3  # the events of one write share its entry's id


def test_the_stream_is_bounded_in_events_whatever_an_entry_holds() -> None:
    """events_max counts events: with entries of ten, the stream keeps about a tenth as many
    entries (common/eventstream.py reads the entries' counts off the stream)."""
    from common.eventstream import SAMPLE_EVERY, StreamBound
    from tests.unit.fakeclock import FakeClock

    r = fakeredis.FakeRedis()
    store = Store(r, events_max=1000)
    clock = FakeClock(0.0)
    store.events_bound = StreamBound(r, EVENTS, 1000, clock=clock)
    assert store.events_bound.entries() == 1000  # an empty stream: an event an entry
    ten = [Event(id=f"e{i}", type=EventType.RECEPTION, time=1.0) for i in range(10)]
    for _ in range(300):
        with r.pipeline() as pipe:
            store.stage_events(pipe, ten)
            pipe.execute()
    assert store.events_bound.per_entry == 1.0  # looked at once, SAMPLE_EVERY ago at most
    clock.now += SAMPLE_EVERY
    assert store.events_bound.entries() == 100 and store.events_bound.per_entry == 10.0
    with r.pipeline() as pipe:
        store.stage_events(pipe, ten)
        pipe.execute()
    assert 100 <= r.xlen(EVENTS) <= 200  # (MAXLEN ~: Redis trims whole nodes)
    r.xadd(EVENTS, dict(Event(id="old", type=EventType.DELIVERY, time=0.5).to_fields()))  # type: ignore[arg-type]
    assert store.events_bound.sample() < 10.0  # an older mtaq's entry counts one


def test_a_call_that_fails_midway_still_reports_what_it_wrote() -> None:
    """The outcomes a call recorded before an entry failed (a damaged message hash) keep their
    events: an event is written exactly when its state is, even in a call that fails."""
    from common.store import msg_key

    r = fakeredis.FakeRedis()
    store = Store(r, events_max=1000)
    store.commit([Message(ENV, BODY)])
    r.hset(msg_key("BAD"), mapping={"v": "2"})  # no envelope, no summary
    done = RecipientStatus(RcptState.DELIVERED, 1, "2.0.0", "250 ok", "mx", updated=5.0)
    ev = outcome_event(ENV, 0, done, "<m1@client.test>")
    with pytest.raises(Exception):  # noqa: B017 (the script's error, as Redis gives it)
        store.set_status_list([("ABC123", 0, done), ("BAD", 0, done)], events=[ev, ev])
    assert store.statuses("ABC123")[0].state is RcptState.DELIVERED
    assert _stream(store) == [ev]
