"""The SASL exchange of AUTH (RFC 4954) for PLAIN (RFC 4616) and LOGIN, as pure steps.

The session checks whether AUTH may be used at all (after EHLO, under TLS, once); this module only
turns the client's base64 lines into credentials, or into the next challenge, or into a refusal.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from ingress import replies
from ingress.replies import Reply

__all__ = ["MECHANISMS", "Answer", "Challenge", "Refused", "Sasl", "Step"]

MECHANISMS = ("PLAIN", "LOGIN")


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send this 334 and read one more response line."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Refused:
    """The exchange ended without credentials; answer this."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Answer:
    """The exchange gave credentials to check."""

    authzid: str
    username: str
    password: str

    def __repr__(self) -> str:
        return f"Answer(authzid={self.authzid!r}, username={self.username!r}, password='***')"

    __str__ = __repr__


Step = Challenge | Refused | Answer


class Sasl:
    """One exchange; ``mechanism`` is one of MECHANISMS."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self._login: list[str] = []

    def start(self, initial: str) -> Step:
        """The AUTH command's initial response ("" when none was given)."""
        if not initial:
            return Challenge(replies.AUTH_CONTINUE if self.mechanism == "PLAIN" else replies.LOGIN_USERNAME)
        if initial == "*":
            return Refused(replies.AUTH_CANCELLED)
        return self.respond(initial.encode("ascii", "replace"))

    def respond(self, b64: bytes) -> Step:
        """One base64 response line."""
        try:
            # RFC 4954 §4: "=" is an empty initial response.
            raw = b"" if b64 == b"=" else base64.b64decode(b64, validate=True)
            text = raw.decode("utf-8")
        except (binascii.Error, ValueError):
            return Refused(replies.AUTH_BAD_BASE64)
        if self.mechanism == "PLAIN":
            parts = text.split("\0")  # RFC 4616 §2: [authzid] NUL authcid NUL passwd
            if len(parts) != 3 or not parts[1]:
                return Refused(replies.AUTH_BAD_BASE64)
            return Answer(parts[0], parts[1], parts[2])
        self._login.append(text)
        if len(self._login) == 1:
            return Challenge(replies.LOGIN_PASSWORD)
        return Answer("", self._login[0], self._login[1])
