"""The envelope model shared by ingress and worker, and its explicit JSON form.

An envelope is what SMTP carried around the message: the reverse path, the forward paths and the
ESMTP parameters that must survive to delivery (RFC 3461 DSN parameters, BODY, SMTPUTF8). The
message itself is stored once, beside it, as bytes. Per-recipient delivery state is kept apart
(``RecipientStatus``) because different workers update different recipients of one message at the
same time.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "FINAL_STATES",
    "LOG_STATUS",
    "DkimPending",
    "Envelope",
    "RcptState",
    "Recipient",
    "RecipientStatus",
    "domain_of",
    "new_queue_id",
    "outcome_of",
]


class RcptState(str, Enum):
    """Where a recipient stands, and mtaq's one outcome vocabulary: a delivery attempt ends
    DELIVERED, DEFERRED (a transient failure: tried again later) or BOUNCED (a permanent failure:
    reported to the sender). "Permanent" and "transient" name these two, nothing else."""

    PENDING = "pending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({RcptState.DELIVERED, RcptState.BOUNCED})

# The word a delivery log line says (``status=sent``): Postfix's, which operators' tools parse. The
# one place "sent" names the outcome; everywhere else it is DELIVERED.
LOG_STATUS = {RcptState.DELIVERED: "sent", RcptState.DEFERRED: "deferred", RcptState.BOUNCED: "bounced"}


def outcome_of(code: int | str) -> RcptState:
    """What a reply means for the recipient, from its SMTP code (250, 451, 550) or its enhanced
    status code ("2.0.0", "4.4.1", "5.1.1"): 2 delivered, 5 bounced (permanent), anything else,
    a malformed code included, deferred (transient: a retry costs less than a wrong bounce)."""
    first = str(code).strip()[:1]
    if first == "2":
        return RcptState.DELIVERED
    if first == "5":
        return RcptState.BOUNCED
    return RcptState.DEFERRED


def new_queue_id() -> str:
    """A queue id that sorts by arrival time: microseconds since the epoch in hex, plus randomness
    so that two ingress processes never collide."""
    return f"{time.time_ns() // 1000:X}{secrets.token_hex(3).upper()}"


def domain_of(address: str) -> str:
    """The domain of a mailbox, lower-cased and without a trailing dot ('' for a bare local part)."""
    _, at, domain = address.rpartition("@")
    return domain.rstrip(".").lower() if at else ""


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    # RFC 3461: NOTIFY (empty tuple = not given, which means FAILURE and DELAY) and ORCPT.
    notify: tuple[str, ...] = ()
    orcpt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"a": self.address}
        if self.notify:
            d["n"] = list(self.notify)
        if self.orcpt is not None:
            d["o"] = self.orcpt
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipient:
        return cls(address=d["a"], notify=tuple(d.get("n", ())), orcpt=d.get("o"))

    def wants(self, kind: str) -> bool:
        """Whether a DSN of ``kind`` (SUCCESS, FAILURE, DELAY) goes to the sender for this recipient."""
        if not self.notify:
            return kind in ("FAILURE", "DELAY")
        return kind in self.notify


@dataclass(frozen=True, slots=True)
class DkimPending:
    """A DKIM signature the ingress worked out up to its private-key operation (common/dkim.py
    ``presign``): the DKIM-Signature field with ``b=`` still empty, and the SHA-256 digest of what
    it signs. The worker signs the digest with the key of (domain, selector) when it delivers the
    message (worker/signing.py): the ingress, the one process every message passes through, is
    spared the ~0.2 ms of an RSA-2048 signature, which the workers, as many as the load needs,
    pay instead. It travels with the envelope because it is what reception decided about the
    message and must survive to delivery, as BODY= and RET= do."""

    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" | "ed25519-sha256"
    field: str  # "DKIM-Signature: v=1; ... b=" (folded with CRLF TAB, no final CRLF)
    digest: bytes  # 32 octets

    def to_list(self) -> list[str]:
        return [self.domain, self.selector, self.algorithm, self.field, base64.b64encode(self.digest).decode("ascii")]

    @classmethod
    def from_list(cls, v: list[str]) -> DkimPending:
        domain, selector, algorithm, field_, digest = v
        return cls(domain, selector, algorithm, field_, base64.b64decode(digest))


@dataclass(slots=True)
class Envelope:
    id: str
    sender: str  # "" is the null reverse path <>
    recipients: list[Recipient]
    received_at: float = field(default_factory=time.time)
    helo: str = ""
    client_addr: str = ""
    client_name: str = ""
    protocol: str = "ESMTP"
    body_8bit: bool = False  # BODY=8BITMIME on MAIL
    smtputf8: bool = False
    ret: str | None = None  # RFC 3461 RET=FULL|HDRS
    envid: str | None = None  # RFC 3461 ENVID (xtext decoded)
    auth_user: str | None = None
    # from mynetworks or authenticated (issue 11.3): only then may a DSN return the whole message
    trusted: bool = False
    requiretls: bool = False  # RFC 8689 MAIL FROM REQUIRETLS: only verified TLS, else bounce 5.7.30
    dkim: tuple[DkimPending, ...] = ()  # signatures the worker finishes, in front of the message first

    @property
    def is_bounce(self) -> bool:
        return self.sender == ""

    def to_json(self) -> str:
        d: dict[str, Any] = {
            "v": 1,
            "id": self.id,
            "from": self.sender,
            "rcpt": [r.to_dict() for r in self.recipients],
            "t": self.received_at,
            "helo": self.helo,
            "addr": self.client_addr,
            "name": self.client_name,
            "proto": self.protocol,
        }
        if self.body_8bit:
            d["8bit"] = True
        if self.smtputf8:
            d["utf8"] = True
        if self.ret is not None:
            d["ret"] = self.ret
        if self.envid is not None:
            d["envid"] = self.envid
        if self.auth_user is not None:
            d["auth"] = self.auth_user
        if self.trusted:
            d["trusted"] = True
        if self.requiretls:
            d["requiretls"] = True
        if self.dkim:
            d["dkim"] = [p.to_list() for p in self.dkim]
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Envelope:
        d = json.loads(raw)
        if d.get("v") != 1:
            raise ValueError(f"unknown envelope version {d.get('v')!r}")
        return cls(
            id=d["id"],
            sender=d["from"],
            recipients=[Recipient.from_dict(r) for r in d["rcpt"]],
            received_at=d["t"],
            helo=d.get("helo", ""),
            client_addr=d.get("addr", ""),
            client_name=d.get("name", ""),
            protocol=d.get("proto", "ESMTP"),
            body_8bit=d.get("8bit", False),
            smtputf8=d.get("utf8", False),
            ret=d.get("ret"),
            envid=d.get("envid"),
            auth_user=d.get("auth"),
            trusted=d.get("trusted", False),
            requiretls=d.get("requiretls", False),
            dkim=tuple(DkimPending.from_list(p) for p in d.get("dkim", ())),
        )


@dataclass(slots=True)
class RecipientStatus:
    """Where one recipient of one message stands. Stored as JSON, one hash field per recipient."""

    state: RcptState = RcptState.PENDING
    attempts: int = 0
    dsn: str = ""  # enhanced status code of the last outcome, e.g. "5.1.1"
    reply: str = ""  # the remote reply (or our own diagnostic) of the last attempt
    relay: str = ""  # host[ip]:port that gave the reply, "none" when no host answered
    remote_mta: str = ""  # the host name that gave the reply (Remote-MTA of a DSN)
    updated: float = 0.0
    next_attempt: float = 0.0  # when a deferred recipient is due again (a retry job runs then)
    tls: str = ""  # the last attempt's TLS: none, opportunistic, verified(mta-sts|dane|pkix) + protocol, cipher

    @property
    def final(self) -> bool:
        return self.state.final

    def to_json(self) -> str:
        return json.dumps(
            {
                "s": self.state.value,
                "n": self.attempts,
                "d": self.dsn,
                "r": self.reply,
                "h": self.relay,
                "m": self.remote_mta,
                "t": self.tls,
                "u": self.updated,
                "x": self.next_attempt,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> RecipientStatus:
        d = json.loads(raw)
        return cls(
            state=RcptState(d["s"]),
            attempts=d.get("n", 0),
            dsn=d.get("d", ""),
            reply=d.get("r", ""),
            relay=d.get("h", ""),
            remote_mta=d.get("m", ""),
            tls=d.get("t", ""),
            updated=d.get("u", 0.0),
            next_attempt=d.get("x", 0.0),
        )
