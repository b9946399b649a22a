"""DKIM signing (RFC 6376) with RSA-SHA256 and Ed25519-SHA256 (RFC 8463): pure functions.

``sign(message, keys, now)`` gives the ``DKIM-Signature:`` header fields to put in front of a
message, one per key; ``keys_for(table, domain)`` picks the keys of a domain or of its nearest
parent that has some (DMARC relaxed alignment: mail from news.example.com signed d=example.com
aligns). The ingress signs mail from trusted clients and the worker its own delivery reports, so
this lives in common/; reading the key table is common/dkimkeys.py's job.

Canonicalization is relaxed/relaxed (RFC 6376 §3.4.2, §3.4.4): it survives the re-folding and
trailing-space trimming that relays do. ``h=`` lists the fields of ``SIGNED_FIELDS`` present in the
message, each as many times as it occurs; From once more ("oversigned", §8.15), so that a From
added on the way breaks the signature instead of being displayed under ours.

Why our own ~150 lines rather than dkimpy's ``sign()``: dkimpy computes RSA in pure Python
(``dkim/crypto.py``), measured 5.4 ms per RSA-2048 signature against 0.2 ms through
``cryptography`` (OpenSSL) on the same 4 KiB message: at the ingress, on every trusted message,
that is the difference between signing costing nothing and capping one ingress process at ~180
messages a second. dkimpy (and OpenDKIM in the integration tests) verify what we sign.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from common.envelope import DkimPending
from common.mime7bit import to_7bit

__all__ = [
    "SIGNED_FIELDS",
    "Parsed",
    "SigningKey",
    "body_hash",
    "finish",
    "from_domain",
    "header_fields",
    "keys_for",
    "parse_head",
    "presign",
    "presign_7bit",
    "public_key_record",
    "sign",
    "sign_7bit",
    "well_formed",
]

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

# What the issue (and Gmail's one-click unsubscribe, RFC 8058 §4) asks to be covered, where present.
SIGNED_FIELDS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
OVERSIGNED = ("from",)

_WSP_RUN = re.compile(rb"[ \t]+")
_WSP_TO_SPACE = re.compile(rb"[ \t]{2,}|\t")  # what relaxed canonicalization changes: runs and tabs
_FOLD = re.compile(rb"\r\n(?=[ \t])")
# RFC 6376 §3.5: b= and the other tag values may be folded anywhere with FWS; 72 keeps lines short
_B64_LINE = 72


@dataclass(frozen=True, slots=True)
class SigningKey:
    domain: str  # d=, lower case, no trailing dot
    selector: str  # s=
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    source: str = ""  # where it was read from, for messages (never the key itself)

    @property
    def algorithm(self) -> Algorithm:
        return "ed25519-sha256" if isinstance(self.private, ed25519.Ed25519PrivateKey) else "rsa-sha256"

    @property
    def key_type(self) -> str:
        return "ed25519" if self.algorithm == "ed25519-sha256" else "rsa"

    def __repr__(self) -> str:  # never the key material, not even in a traceback's locals
        return f"SigningKey({self.domain!r}, {self.selector!r}, {self.key_type}, {self.source!r})"


def public_key_record(key: SigningKey) -> str:
    """The TXT record's value: ``v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>`` (RFC 6376 §3.6.1)
    or, for Ed25519, ``p=`` the raw 32-octet public key (RFC 8463 §4.2)."""
    return f"v=DKIM1; k={key.key_type}; p={public_key_base64(key.private)}"


def public_key_base64(private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    pub = private.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def keys_for(table: Mapping[str, Sequence[SigningKey]], domain: str) -> Sequence[SigningKey]:
    """The keys of ``domain`` or of its nearest parent domain that has keys; () if none."""
    labels = domain.lower().rstrip(".").split(".")
    for i in range(len(labels)):
        found = table.get(".".join(labels[i:]))
        if found:
            return found
    return ()


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header block without its final CRLF, body). A message without an empty line is all header."""
    head, body_at = split_head(message)
    return head, message[body_at:]


def split_head(message: bytes) -> tuple[bytes, int]:
    """(header block without its final CRLF, where the body starts): the body is not copied (1 MiB:
    ~0.1 ms of the ingress's loop, for what only a signature reads). A message without an empty
    line is all header, and its body starts at its end."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return (message[:-2] if message.endswith(b"\r\n") else message), len(message)
    return message[:end], end + 4


_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")  # RFC 5322 §3.6.8 ftext, then the colon
# The From: most mail has, ``addr@domain``, ``<addr@domain>`` or ``Name <addr@domain>`` in ASCII with
# no quotes, comments, groups or folding: its domain in one match (~1 us) rather than through the
# email package's address parser (~6 us); anything else goes through the parser as before.
_PLAIN_FROM = re.compile(rb" *(?:([A-Za-z0-9 ._'-]*)<)?[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@([A-Za-z0-9.-]+)(>)? *")


def parse_head(head: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The header block's fields as (name, raw value with its folding), in order, and whether every
    line of it starts a field (``name:``) or continues one. A line before any field that is not a
    field (no colon) is skipped: it cannot be signed or looked up. A message with such a line is
    not signed: verifiers (dkimpy, OpenDKIM) refuse to parse it, so a signature could never pass."""
    fields: list[tuple[bytes, bytes]] = []
    ok = True
    for line in head.split(b"\r\n") if head else ():
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
            continue
        if ok and _FIELD_START.match(line) is None:
            ok = False
        name, colon, value = line.partition(b":")
        if colon:
            fields.append((name, value))
    return fields, ok


def header_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The header block's fields (see parse_head)."""
    return parse_head(head)[0]


def well_formed(head: bytes) -> bool:
    """Whether every line of the header block starts a field or continues one (see parse_head)."""
    return parse_head(head)[1]


@dataclass(frozen=True, slots=True)
class Parsed:
    """A message cut once into its header fields and body, for everything that reads them before
    it is signed (the ingress: which fields are missing, the From: domain, the signature): each
    parse of the header block is a few microseconds on every trusted message."""

    message: bytes
    fields: list[tuple[bytes, bytes]]
    well_formed: bool
    body_at: int  # where the body starts in ``message`` (its length when it has none)

    @classmethod
    def of(cls, message: bytes) -> Parsed:
        head, body_at = split_head(message)
        fields, ok = parse_head(head)
        return cls(message, fields, ok, body_at)

    @property
    def body(self) -> bytes:
        return self.message[self.body_at :]

    def names(self) -> set[bytes]:
        """The fields' names present, lower case."""
        return {name.strip().lower() for name, _ in self.fields}

    def prepend(self, fields: bytes) -> Parsed:
        """The message with ``fields`` (whole fields, each ending in CRLF) in front of its header."""
        if not fields:
            return self
        more, ok = parse_head(fields[:-2])
        return Parsed(fields + self.message, more + self.fields, ok and self.well_formed, self.body_at + len(fields))

    def from_domain(self) -> str | None:
        """The domain of the From: field's mailbox, lower case; None when there is not exactly one
        From: field with one address in it (DMARC, RFC 7489 §6.6.1, cannot align such mail either)."""
        values = [v for n, v in self.fields if n.strip().lower() == b"from"]
        if len(values) != 1:
            return None
        plain = _PLAIN_FROM.fullmatch(values[0])
        if plain is not None and (plain.group(1) is None) == (plain.group(3) is None):
            return plain.group(2).decode("ascii").rstrip(".").lower() or None
        text = _FOLD.sub(b"", values[0]).decode("utf-8", "replace")
        addresses = [a for _, a in getaddresses([text]) if a]
        if len(addresses) != 1 or "@" not in addresses[0]:
            return None
        return addresses[0].rpartition("@")[2].strip().rstrip(".").lower() or None


def from_domain(message: bytes) -> str | None:
    """``Parsed.from_domain`` of a message."""
    return Parsed.of(message).from_domain()


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 §3.4.2: name lower case, unfolded, runs of WSP to one SP, trimmed around the colon.
    (The regular expressions run only where there is something for them to change: most values
    have no folding and no double space, and a substitution that finds nothing still costs.)"""
    if b"\r\n" in value:
        value = _FOLD.sub(b"", value)
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return name.strip().lower() + b":" + value.strip(b" ")


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4: WSP runs to one SP, none at a line's end, no empty lines at the end; a
    non-empty body ends in CRLF, an empty one is empty. Over the whole body at once (lines end in
    CRLF: the ingress refuses bare CR and LF), touching only the whitespace that changes. The
    search for a tab or two spaces (memchr speed) spares most bodies the regular expression, which
    steps through every octet (~40 us for 4 KiB)."""
    if b"\t" in body or b"  " in body:
        body = _WSP_TO_SPACE.sub(b" ", body)
    body = body.replace(b" \r\n", b"\r\n")  # after the runs became one SP: one pass does it
    if body.endswith(b" "):  # the last line, without its CRLF
        body = body.rstrip(b" ")
    body = body.rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def body_hash(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()).decode("ascii")


def _signed_names(fields: Sequence[tuple[bytes, bytes]]) -> list[str]:
    present = [n.strip().lower().decode("ascii", "replace") for n, _ in fields]
    names = [name for name in present if name in SIGNED_FIELDS]
    return names + [name for name in OVERSIGNED if name in present]


def _selected(fields: Sequence[tuple[bytes, bytes]], names: Sequence[str]) -> list[bytes]:
    """The canonical fields ``h=`` names, each name taking its fields from the bottom up (§5.4.2);
    a name with none left (oversigning) contributes nothing."""
    left: dict[str, list[tuple[bytes, bytes]]] = {}
    for name, value in fields:
        left.setdefault(name.strip().lower().decode("ascii", "replace"), []).append((name, value))
    out = []
    for wanted in names:
        instances = left.get(wanted)
        if instances:
            out.append(_relaxed_header(*instances.pop()) + b"\r\n")
    return out


def _fold_tags(tags: Sequence[str]) -> str:
    """``tag=value;`` items joined on lines of at most ~78 characters (FWS after ``;``); a long
    ``h=`` is folded after its colons, where RFC 6376 §3.5 allows FWS."""
    lines = ["DKIM-Signature:"]
    for tag in tags:
        pieces = re.findall(r"[^:]+:?", tag) if tag.startswith("h=") else [tag]
        for i, piece in enumerate(pieces):
            if len(lines[-1]) + 1 + len(piece) > 78:
                lines.append("\t" + piece)
            else:
                lines[-1] += (" " if i == 0 else "") + piece
    return "\r\n".join(lines)


def presign(message: bytes | Parsed, keys: Sequence[SigningKey], now: int) -> list[DkimPending]:
    """One ``DkimPending`` per key of ``keys``, in their order: each DKIM-Signature field of
    ``message`` (CRLF line ends; or already parsed) worked out up to its private-key operation,
    which ``finish`` does. [] when there is nothing to sign (no keys, no From:, a malformed header
    block)."""
    if not keys:
        return []
    parsed = message if isinstance(message, Parsed) else Parsed.of(message)
    if not parsed.well_formed:
        return []
    fields, body = parsed.fields, parsed.body
    names = _signed_names(fields)
    if "from" not in names:
        return []  # RFC 6376 §5.4: From MUST be signed; a message without one is not ours to sign
    signed = b"".join(_selected(fields, names))
    bh = body_hash(body)
    out = []
    for key in keys:
        tags = [
            "v=1;",
            f"a={key.algorithm};",
            "c=relaxed/relaxed;",
            f"d={key.domain};",
            f"s={key.selector};",
            f"t={now};",
            f"h={':'.join(names)};",
            f"bh={bh};",
            "b=",
        ]
        field = _fold_tags(tags)
        name, _, value = field.encode("ascii").partition(b":")
        data = signed + _relaxed_header(name, value)  # the signature's own field, b= empty, no CRLF
        out.append(DkimPending(key.domain, key.selector, key.algorithm, field, hashlib.sha256(data).digest()))
    return out


def finish(pending: DkimPending, key: SigningKey) -> bytes:
    """The whole DKIM-Signature field (ending in CRLF): ``pending``'s with the signature by ``key``,
    which must be the key it names (ValueError if not). RSA PKCS#1 v1.5 and Ed25519 signatures are
    deterministic: finishing the same pending signature again gives the same field, octet for octet."""
    if (key.domain, key.selector, key.algorithm) != (pending.domain, pending.selector, pending.algorithm):
        raise ValueError(f"{key!r} is not the key of d={pending.domain} s={pending.selector} a={pending.algorithm}")
    if isinstance(key.private, ed25519.Ed25519PrivateKey):
        # RFC 8463 §3: Ed25519 signs the SHA-256 hash of the data (PureEdDSA over the digest)
        raw = key.private.sign(pending.digest)
    else:
        raw = key.private.sign(pending.digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    b = base64.b64encode(raw).decode("ascii")
    return (
        pending.field + "".join(f"\r\n\t{b[i : i + _B64_LINE]}" for i in range(0, len(b), _B64_LINE)) + "\r\n"
    ).encode("ascii")


def sign(message: bytes | Parsed, keys: Sequence[SigningKey], now: int) -> bytes:
    """The DKIM-Signature fields (each ending in CRLF) that sign ``message`` (CRLF line ends; or
    already parsed) with every key in ``keys``, newest first as they go in front of the message;
    b"" for no keys."""
    return _finished(presign(message, keys, now), keys)


def _finished(pending: Sequence[DkimPending], keys: Sequence[SigningKey]) -> bytes:
    """``presign``'s signatures (in the order of ``keys``; none or one a key) finished at once,
    newest first as they go in front of the message."""
    return b"".join(reversed([finish(p, k) for p, k in zip(pending, keys, strict=False)]))


def presign_7bit(
    message: bytes | Parsed, keys: Sequence[SigningKey], now: int
) -> tuple[bytes, list[DkimPending], bool]:
    """``message`` made 7-bit where it can be (common/mime7bit.py), and its signatures up to the
    private-key operation (``presign``): (the message as it is to be signed and sent, the pending
    signatures, whether it was converted). A next hop without 8BITMIME gets mail converted to 7-bit
    by the worker, which would break a signature made before; RFC 6376 §5.3 asks signers to convert
    first. What cannot be converted (8-bit header fields, 8-bit text without MIME) is signed as it
    is: the worker cannot convert it either and sends it as signed."""
    raw = message.message if isinstance(message, Parsed) else message
    if not keys:
        return raw, [], False
    converted = to_7bit(raw)
    if converted is None or converted is raw:  # as it was: a parse made before still holds
        return raw, presign(message, keys, now), False
    return converted, presign(converted, keys, now), True


def sign_7bit(message: bytes | Parsed, keys: Sequence[SigningKey], now: int) -> tuple[bytes, bool]:
    """``presign_7bit`` finished at once: (the signed message, whether it was converted)."""
    raw, pending, converted = presign_7bit(message, keys, now)
    return _finished(pending, keys) + raw, converted
