"""What the sans-IO session hands its caller (h11's events): replies to write and work to do.

The caller carries each out and reports back to the session (``message_stored``/``message_failed``,
``tls_started``, ``auth_result``). ``Peer`` is what the caller tells the session about the client.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.envelope import Recipient

__all__ = ["Authenticate", "AwaitFlow", "Close", "Event", "Peer", "Send", "StartTLS", "Transaction", "VerifyRecipient"]


@dataclass(frozen=True, slots=True)
class Peer:
    ip: str
    port: int
    name: str = "unknown"  # verified reverse name, or "unknown"


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the client (one or more complete reply lines)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Transaction:
    """A complete message. The server stores it, then calls message_stored() or message_failed()."""

    sender: str
    recipients: tuple[Recipient, ...]
    data: bytes  # dot-unstuffed, CRLF line endings, without the final ".\r\n"
    helo: str
    protocol: str
    body_8bit: bool
    smtputf8: bool
    ret: str | None
    envid: str | None
    auth_user: str | None
    trusted: bool = False  # the client was in mynetworks or authenticated (DSNs with full content)
    requiretls: bool = False  # RFC 8689: deliver only over verified TLS, or bounce 5.7.30


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Upgrade the socket now (the 220 reply went out in the Send before), then call tls_started()."""


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Verify these credentials, then call auth_result(ok)."""

    mechanism: str
    authzid: str
    username: str
    password: str

    def __repr__(self) -> str:
        return (
            f"Authenticate(mechanism={self.mechanism!r}, authzid={self.authzid!r}, "
            f"username={self.username!r}, password='***')"
        )

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection after writing the pending Sends. reply_sent: a final reply (221/421) went
    out; False when the client closed first."""

    reply_sent: bool = True


@dataclass(frozen=True, slots=True)
class VerifyRecipient:
    """Ask the next hop whether this relay-domain recipient exists, then call
    recipient_verified(None) to accept it or recipient_verified(reply) to refuse it."""

    address: str


@dataclass(frozen=True, slots=True)
class AwaitFlow:
    """Delivery lags behind the ingress (mail input flow control, Postfix's in_flow_delay): hold
    this MAIL until delivery catches up or in_flow_delay passes, then call flow_granted()."""


Event = Send | Transaction | StartTLS | Authenticate | Close | VerifyRecipient | AwaitFlow
