"""What the ingress does to mail from trusted clients before it is stored: the header fields
mailbox providers require, and DKIM signatures (common/dkim.py).

Only for trusted clients (mynetworks or authenticated), as Postfix adds headers only for its local
clients (``local_header_rewrite_clients``): mail relayed for strangers under relay_domains is
neither changed nor signed. In order:

1. a missing ``Message-ID:`` gets ``<QUEUEID@hostname>`` and a missing ``Date:`` the arrival time,
   in front of the header fields, so that both are signed;
2. when a key covers the From: domain and the message has 8-bit content, it is converted to 7-bit
   MIME (common/mime7bit.py) before it is signed (RFC 6376 §5.3: a signer SHOULD convert first):
   the worker converts 8-bit mail for a next hop without 8BITMIME, and a conversion after signing
   breaks the body hash. What cannot be converted is signed as it is; the worker cannot convert
   it either, so it is sent as signed;
3. one DKIM-Signature per key of the From: domain or its nearest parent with keys, worked out here
   up to its private-key operation (common/dkim.py ``presign``: the canonical header fields, the
   body hash, the digest). The envelope carries them (``Envelope.dkim``) and the worker signs the
   digests when it delivers (worker/signing.py): the RSA-2048 signature, ~0.2 ms of CPU, was most of
   what signing cost the ingress's one event loop, which every message waits on; the workers are as
   many as the load needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from common import dkim
from common.dates import format_date
from common.dkimkeys import KeyTable
from common.envelope import DkimPending

__all__ = ["Prepared", "TrustedMail", "add_missing_fields"]


@dataclass(frozen=True, slots=True)
class Prepared:
    data: bytes  # the message to store: with the fields added, converted to 7-bit if it was
    body_8bit: bool  # still 8-bit after the conversion (the envelope's BODY=8BITMIME)
    # the signatures the worker finishes (Envelope.dkim), in the order they go in front of ``data``
    pending: tuple[DkimPending, ...] = ()


def add_missing_fields(data: bytes, *, queue_id: str, hostname: str, when: float) -> bytes:
    """``data`` with Message-ID and Date put in front of its header fields when missing (the order of
    fields means nothing to RFC 5322 §3.6; in front, the client's own header block stays byte for
    byte as it was sent)."""
    return _with_missing(dkim.Parsed.of(data), queue_id=queue_id, hostname=hostname, when=when).message


def _with_missing(parsed: dkim.Parsed, *, queue_id: str, hostname: str, when: float) -> dkim.Parsed:
    present = parsed.names()
    extra = b""
    if b"message-id" not in present:
        extra += f"Message-ID: <{queue_id}@{hostname}>\r\n".encode("ascii", "replace")
    if b"date" not in present:
        extra += f"Date: {format_date(when)}\r\n".encode("ascii")
    return parsed.prepend(extra)


class TrustedMail:
    """The ingress's preparation of trusted clients' mail; ``keys`` None = no signing."""

    def __init__(self, hostname: str, keys: KeyTable | None) -> None:
        self.hostname = hostname
        self.keys = keys

    def prepare(self, data: bytes, *, queue_id: str, when: float, body_8bit: bool) -> Prepared:
        # the header block is parsed once, here, for the missing fields, the From: domain and the
        # signature alike
        parsed = _with_missing(dkim.Parsed.of(data), queue_id=queue_id, hostname=self.hostname, when=when)
        if self.keys is None:
            return Prepared(parsed.message, body_8bit)
        domain = parsed.from_domain()
        keys = self.keys.keys_for(domain) if domain else ()
        if not keys:
            return Prepared(parsed.message, body_8bit)
        data, pending, converted = dkim.presign_7bit(parsed, keys, int(when))
        return Prepared(data, body_8bit and not converted, tuple(reversed(pending)))
