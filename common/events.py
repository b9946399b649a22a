"""Delivery events: the vocabulary, the builders and the two serialisations of what the stream
``mtaq:events`` (common/store.py) holds and the webhook POSTs.

An event is one recipient's news: its message was received, delivered, deferred (``transient``),
bounced, expired, delayed (a delay warning went to the sender) or refused because the address is
suppressed. In the stream an entry holds the events of one write as the JSON array the webhook
sends (``entry_fields``, objects of ``to_json_obj``); ``parse_entries`` reads entries back, an
older mtaq's one-event entries of string fields (``to_fields``) too. The ``id`` is
chosen before the write and stored with the event, so it is the same on every retry of a POST;
for outcomes it is derived from the queue id, recipient and attempt, so a job that runs again after
a crash writes the same id. Builders are pure (the clock is passed in).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from common.classify import classify
from common.envelope import Envelope, RcptState, RecipientStatus
from common.storeio import reply_text

__all__ = [
    "ENTRY_COUNT_FIELD",
    "ENTRY_FIELD",
    "SIGNATURE_HEADER",
    "Event",
    "EventType",
    "delayed_event",
    "entry_count",
    "entry_events",
    "entry_fields",
    "event_json",
    "message_id_of",
    "outcome_event",
    "outcome_type",
    "parse_entries",
    "reception_events",
    "receptions",
    "sign",
    "signature_ok",
    "suppressed_event",
]

SIGNATURE_HEADER = "X-Mtaq-Signature"


class EventType(str, Enum):
    RECEPTION = "reception"
    DELIVERY = "delivery"
    TRANSIENT = "transient"
    BOUNCE = "bounce"
    EXPIRATION = "expiration"
    DELAYED = "delayed"
    SUPPRESSED = "suppressed"


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: EventType
    time: float
    queue_id: str = ""
    message_id: str = ""
    sender: str = ""
    recipient: str = ""
    relay: str = ""
    dsn: str = ""
    reply: str = ""
    tls: str = ""  # the attempt's TLS as the delivery line says it (RecipientStatus.tls, issue 21)
    attempt: int = 0
    classification: str = ""

    def to_fields(self) -> dict[str, str]:
        """The stream entry: every field, as text (an empty one included, so every entry has the
        same fields: Redis then stores their names once per node). Spelled out: it runs for
        every recipient on the commit path."""
        return {
            "id": self.id,
            "type": self.type.value,
            "time": repr(self.time),
            "queue_id": self.queue_id,
            "message_id": self.message_id,
            "sender": self.sender,
            "recipient": self.recipient,
            "relay": self.relay,
            "dsn": self.dsn,
            "reply": self.reply,
            "tls": self.tls,
            "attempt": str(self.attempt),
            "classification": self.classification,
        }

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> Event:
        d = {reply_text(k, "replace"): reply_text(v, "replace") for k, v in raw.items()}
        return cls(
            id=d["id"],
            type=EventType(d["type"]),
            time=float(d["time"]),
            queue_id=d.get("queue_id", ""),
            message_id=d.get("message_id", ""),
            sender=d.get("sender", ""),
            recipient=d.get("recipient", ""),
            relay=d.get("relay", ""),
            dsn=d.get("dsn", ""),
            reply=d.get("reply", ""),
            tls=d.get("tls", ""),
            attempt=int(d.get("attempt") or 0),
            classification=d.get("classification", ""),
        )

    def to_json_obj(self) -> dict[str, Any]:
        """What the webhook POSTs for it: the same fields, time and attempt as numbers."""
        out: dict[str, Any] = self.to_fields()
        out["time"] = self.time
        out["attempt"] = self.attempt
        return out

    @classmethod
    def from_json_obj(cls, obj: Mapping[str, Any]) -> Event:
        return cls.from_fields({k: "" if v is None else str(v) for k, v in obj.items()})


# A stream entry holds the events of one write (a group commit's receptions, an outcome writer's
# call): field ENTRY_FIELD, the JSON array the webhook POSTs (issue 15: one XADD a write, where one
# a recipient was a Redis command a message of its own). An entry an older mtaq wrote is one event
# in string fields (``to_fields``); readers take both.
ENTRY_FIELD = "events"
# and how many events it holds: `events_max` counts events, so the stream's length in entries is
# events_max over the events an entry holds on average (common/eventstream.py)
ENTRY_COUNT_FIELD = "n"


def event_json(ev: Event) -> str:
    """One event as the entry's array holds it (and the webhook sends it)."""
    return json.dumps(ev.to_json_obj(), separators=(",", ":"), ensure_ascii=False)


def entry_fields(events: Sequence[Event]) -> dict[str, str]:
    """The stream entry of events written together."""
    return {ENTRY_FIELD: "[" + ",".join(event_json(ev) for ev in events) + "]", ENTRY_COUNT_FIELD: str(len(events))}


def parse_entries(raw: Any) -> list[tuple[str, Event]]:
    """(stream id, event) for every event of what XRANGE returns (or one stream's part of
    XREADGROUP's answer), in stream order; the events of one entry share its id."""
    out: list[tuple[str, Event]] = []
    for sid, fields in raw or []:
        out += [(reply_text(sid, "replace"), ev) for ev in entry_events(fields)]
    return out


def entry_events(fields: Mapping[Any, Any]) -> list[Event]:
    """The events of one stream entry: an array (ENTRY_FIELD) or an older mtaq's single event."""
    batch = _field(fields, ENTRY_FIELD)
    if batch is None:
        return [Event.from_fields(fields)]
    return [Event.from_json_obj(obj) for obj in json.loads(batch)]


def entry_count(fields: Mapping[Any, Any]) -> int:
    """How many events a stream entry holds (an older mtaq's one-event entries: 1)."""
    raw = _field(fields, ENTRY_COUNT_FIELD)
    try:
        return max(1, int(raw)) if raw is not None else 1
    except ValueError:
        return 1


def _field(fields: Mapping[Any, Any], name: str) -> Any:
    """A field of a stream entry, whether the client decodes responses or not (common/msglayout.py
    ``field`` does this for hashes; it sits above this module)."""
    got = fields.get(name)
    return fields.get(name.encode()) if got is None else got


# -- builders -------------------------------------------------------------------------------------

_FIELD_VALUE = re.compile(rb"[ \t]*((?:[^\r\n]|\r?\n[ \t])*)")  # up to the end of its last folded line
MAX_MESSAGE_ID = 998  # RFC 5322 §2.1.1: a header line is at most 998 octets


def _header_end(body: bytes) -> int:
    """Where the header block's empty line starts (its LF), or len(body) when there is none. By
    ``find`` (memchr speed): a regular expression for ``\r?\n\r?\n`` tries every octet of the
    header, ~2 us for a plain one and ~6 us behind a DKIM signature, on every message stored and
    delivered."""
    crlf = body.find(b"\n\r\n")
    end = crlf if crlf >= 0 else len(body)
    lf = body.find(b"\n\n", 0, end)  # bare LF line ends: only before the first CRLF one
    return lf if lf >= 0 else end


def message_id_of(body: bytes) -> str:
    """The Message-ID header of a message ("" when it has none), looked for in its header only."""
    head = body[: _header_end(body)]
    low = head.lower()
    if low.startswith(b"message-id:"):
        at = 0
    else:
        at = low.find(b"\nmessage-id:") + 1  # a field's name starts a line
        if at == 0:
            return ""
    m = _FIELD_VALUE.match(head, at + len(b"message-id:"))
    value = m.group(1) if m is not None else b""  # (the pattern matches the empty string too)
    if b"\n" in value:
        value = re.sub(rb"\r?\n[ \t]+", b" ", value)
    value = value.strip()
    return value[:MAX_MESSAGE_ID].decode("utf-8", "replace")


def reception_events(env: Envelope, message_id: str, now: float) -> list[Event]:
    """One ``reception`` event per recipient of a message the ingress stored."""
    return [
        Event(
            id=f"{env.id}.{i}.reception",
            type=EventType.RECEPTION,
            time=now,
            queue_id=env.id,
            message_id=message_id,
            sender=env.sender,
            recipient=r.address,
        )
        for i, r in enumerate(env.recipients)
    ]


def receptions(messages: Iterable[tuple[Envelope, bytes]], now: float) -> list[Event]:
    """The ``reception`` events of messages (envelope, body) stored together."""
    return [ev for env, body in messages for ev in reception_events(env, message_id_of(body), now)]


def outcome_type(st: RecipientStatus) -> EventType:
    """What a recorded delivery attempt was. A bounce whose code is not permanent is the queue
    lifetime running out on a transient failure (worker/outcomes.py keeps the last transient
    reply): an expiration."""
    if st.state is RcptState.DELIVERED:
        return EventType.DELIVERY
    if st.state is RcptState.BOUNCED:
        return EventType.BOUNCE if st.dsn.startswith("5") else EventType.EXPIRATION
    return EventType.TRANSIENT


def outcome_event(env: Envelope, index: int, st: RecipientStatus, message_id: str) -> Event:
    """The event of one recorded attempt (``st`` is what is written for recipient ``index``)."""
    kind = outcome_type(st)
    return Event(
        id=f"{env.id}.{index}.{kind.value}.{st.attempts}",
        type=kind,
        time=st.updated,
        queue_id=env.id,
        message_id=message_id,
        sender=env.sender,
        recipient=env.recipients[index].address,
        relay=st.relay,
        dsn=st.dsn,
        reply=st.reply,
        tls=st.tls,
        attempt=st.attempts,
        classification="" if kind is EventType.DELIVERY else classify(st.dsn, st.reply).value,
    )


def delayed_event(env: Envelope, index: int, st: RecipientStatus, message_id: str, now: float) -> Event:
    """A delay warning went to the sender about this (deferred) recipient, once per message: the
    fields of its last attempt."""
    last = outcome_event(env, index, st, message_id)
    return dataclasses.replace(last, id=f"{env.id}.{index}.delayed", type=EventType.DELAYED, time=now)


def suppressed_event(sender: str, recipient: str, reply: str, now: float) -> Event:
    """A RCPT refused because the address is on the suppression list: no queue id yet."""
    return Event(
        id=f"s.{secrets.token_hex(12)}",
        type=EventType.SUPPRESSED,
        time=now,
        sender=sender,
        recipient=recipient,
        dsn="5.1.1",
        reply=reply,
        classification="InvalidRecipient",
    )


# -- the webhook's signature ------------------------------------------------------------------------


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Mtaq-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def signature_ok(secret: bytes, body: bytes, header: str) -> bool:
    return hmac.compare_digest(sign(secret, body), header.strip())
