"""What an MX requires of TLS, and whether a certificate satisfies it (issue 21).

The SMTP conversation asks two questions and nothing more: before connecting, "what does this MX
require" (a ``Requirement``, from DANE (worker/dane.py) or MTA-STS (worker/mtasts.py), DANE first
as RFC 8461 §2 wants); after the TLS handshake, "does this certificate chain satisfy it"
(``check_chain``, a pure function of the requirement, the chain, the trust anchors and the time).
``Failure`` carries the RFC 8460 result type (TLS-RPT) and the diagnostic the recipients get.

Without a policy the level is Postfix's ``may`` (opportunistic, RFC 7435): STARTTLS when offered,
any certificate. ``TLSUsed`` says afterwards what a session had: ``none``, ``opportunistic`` or
``verified(mta-sts|dane|pkix)``, with the protocol and cipher, for the log line and `mtaq queue show`.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # imported where used: a worker that never meets a policy never loads it (16 MiB per process)
    from cryptography import x509
    from cryptography.x509.verification import Store

__all__ = [
    "OPPORTUNISTIC",
    "TLSA",
    "Failure",
    "Requirement",
    "TLSUsed",
    "TrustAnchors",
    "check_chain",
    "requiretls_refusal",
    "tls_required_no",
    "tlsa_matches",
]

# RFC 7672 §2.2: the TLSA usages an SMTP client may use, and what they mean
DANE_TA, DANE_EE = 2, 3
SELECTORS = (0, 1)  # full certificate, SubjectPublicKeyInfo
MATCHING = (0, 1, 2)  # exact, SHA2-256, SHA2-512


@dataclass(frozen=True, slots=True)
class TLSA:
    """One TLSA record (RFC 6698 §2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 §3.1.3: PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP; unknown parameters too."""
        return self.usage in (DANE_TA, DANE_EE) and self.selector in SELECTORS and self.mtype in MATCHING


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a session did not meet its policy: ``result_type`` is RFC 8460's (§4.3), ``text`` the
    diagnostic (it names the policy), ``dsn`` the enhanced status code of the deferral."""

    result_type: str
    text: str
    dsn: str = "4.7.5"


@dataclass(frozen=True, slots=True)
class Requirement:
    """What one MX requires. ``policy``: "" (none: opportunistic), "mta-sts" or "dane".
    ``enforce``: a failure skips the MX (MTA-STS ``testing`` records it and delivers as before).
    ``refuse``: this MX may not be used at all (not in an enforced MTA-STS policy, a failed TLSA
    lookup for a signed name). ``domain``: the policy domain, for TLS-RPT."""

    policy: str = ""
    enforce: bool = False
    domain: str = ""
    tlsa: tuple[TLSA, ...] = ()
    refuse: Failure | None = None

    @property
    def label(self) -> str:
        """The policy's name in diagnostics."""
        return {"dane": "DANE", "mta-sts": "MTA-STS"}.get(self.policy, "TLS")

    def failure(self, result_type: str, what: str, dsn: str = "4.7.5") -> Failure:
        mode = "" if self.enforce or not self.policy else " (testing)"
        where = f" of {self.domain}" if self.domain else ""
        return Failure(result_type, f"{self.label} policy{where}{mode}: {what}", dsn)


OPPORTUNISTIC = Requirement()


@dataclass(frozen=True, slots=True)
class TLSUsed:
    """What a session had: ``level`` none, opportunistic or verified(<policy>)."""

    level: str = "none"
    protocol: str = ""
    cipher: str = ""

    def __str__(self) -> str:
        return " ".join(p for p in (self.level, self.protocol, self.cipher) if p)


class TrustAnchors:
    """The CA certificates of ``tls_ca_file`` (or the system's bundle), parsed once, on first use
    and then shared by every conversation of the process."""

    def __init__(self, path: str = "") -> None:
        self.path = path or _system_bundle()
        self._store: Store | None = None
        self._lock = threading.Lock()

    def load(self) -> Store | None:
        """The store, or None when the bundle holds no certificate. Raises ValueError (one line)
        for a ``tls_ca_file`` that cannot be read or holds no certificate."""
        if not self.path:
            return None
        with self._lock:
            if self._store is None:
                from cryptography.x509.verification import Store

                certs = _read_bundle(self.path)
                if not certs:
                    raise ValueError(f"tls_ca_file {self.path!r}: no PEM certificate in it")
                self._store = Store(certs)
            return self._store

    def context(self) -> ssl.SSLContext:
        """A client context verifying servers against these anchors (the MTA-STS policy fetch)."""
        ctx = ssl.create_default_context(cafile=self.path) if self.path else ssl.create_default_context()
        return ctx


def _system_bundle() -> str:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return candidate
    return ""


def _read_bundle(path: str) -> list[x509.Certificate]:
    from cryptography import x509

    if not path:
        return []
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"tls_ca_file {path!r}: {e.strerror or e}") from None
    certs: list[x509.Certificate] = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for block in data.split(marker)[1:]:
        try:
            certs.append(x509.load_pem_x509_certificate(marker + block))
        except ValueError:
            continue  # a system bundle may hold a certificate this parser refuses: not fatal
    return certs


def spki(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _digest(mtype: int, data: bytes) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def tlsa_matches(record: TLSA, cert: x509.Certificate) -> bool:
    """RFC 6698 §2.1: the certificate (selector 0) or its public key (1), hashed as ``mtype`` says."""
    from cryptography.hazmat.primitives.serialization import Encoding

    if not record.usable:
        return False
    selected = cert.public_bytes(Encoding.DER) if record.selector == 0 else spki(cert)
    return _digest(record.mtype, selected) == record.data


# The leaf's extensions as SMTP finds them: a subjectAltName to match the MX name against, and
# otherwise whatever the issuer put there (MX certificates often mark extensions critical or lack
# serverAuth; RFC 7672 §3.2.3 and RFC 8461 §4.2 ask for the name and the chain, not for the Web PKI's
# leaf profile). CA certificates keep the Web PKI's rules (basicConstraints above all).
@functools.cache
def _extension_policies() -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.x509.verification import Criticality, ExtensionPolicy

    ee = ExtensionPolicy.permit_all().require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    return ExtensionPolicy.webpki_defaults_ca(), ee


def _verify(
    store: Store, name: str, leaf: x509.Certificate, rest: Sequence[x509.Certificate], now: datetime.datetime
) -> str | None:
    """PKIX path validation of ``leaf`` for the DNS name ``name``; None or the RFC 8460 result type."""
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, VerificationError

    ca_policy, ee_policy = _extension_policies()
    try:
        builder = PolicyBuilder().store(store).time(now).extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        verifier = builder.build_server_verifier(x509.DNSName(name))
        verifier.verify(leaf, list(rest))
    except VerificationError as e:
        text = str(e).lower()
        if "subjectaltname" in text or ("name" in text and "match" in text):
            return "certificate-host-mismatch"
        if "validation time" in text or "expired" in text:
            return "certificate-expired"
        return "certificate-not-trusted"
    except ValueError:
        return "validation-failure"  # a name the verifier cannot take (not an A-label)
    return None


def check_chain(
    req: Requirement,
    hostname: str,
    chain: Sequence[bytes],
    anchors: TrustAnchors | None,
    now: datetime.datetime | None = None,
) -> Failure | None:
    """Whether the server's chain (DER, leaf first) satisfies ``req`` for the MX ``hostname``.

    DANE (RFC 7672 §3): a DANE-EE(3) record matching the leaf is enough, whatever its name and
    dates; a DANE-TA(2) record must match a certificate of the chain, which then anchors a PKIX
    validation of the leaf for the MX host name. MTA-STS (RFC 8461 §4.2): PKIX validation for the
    MX host name against the trust anchors (``tls_ca_file``)."""
    if not req.policy:
        return None
    from cryptography import x509
    from cryptography.x509.verification import Store

    when = now or datetime.datetime.now(datetime.UTC)
    name = hostname.rstrip(".").lower()
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        certs = []
    if not certs:
        return req.failure("validation-failure", "the server sent no usable certificate")
    leaf, rest = certs[0], certs[1:]
    if req.policy == "dane":
        usable = [r for r in req.tlsa if r.usable]
        if any(r.usage == DANE_EE and tlsa_matches(r, leaf) for r in usable):
            return None
        for record in (r for r in usable if r.usage == DANE_TA):
            for anchor in certs:
                # the matched certificate is the trust anchor, whether self-signed or not
                if tlsa_matches(record, anchor) and _verify(Store([anchor]), name, leaf, rest, when) is None:
                    return None
        return req.failure("tlsa-invalid", f"no TLSA record of {name} matches the certificate chain")
    try:
        store = anchors.load() if anchors is not None else None
    except ValueError:
        store = None  # a bundle that turned out unusable: nothing can be verified against it
    if store is None:
        return req.failure("certificate-not-trusted", "no trust anchors (tls_ca_file)")
    problem = _verify(store, name, leaf, rest, when)
    if problem is not None:
        what = {
            "certificate-host-mismatch": f"certificate not valid for {name}",
            "certificate-expired": f"certificate of {name} expired or not yet valid",
            "validation-failure": f"cannot validate a certificate for {name}",
        }.get(problem, f"certificate of {name} not trusted (tls_ca_file)")
        return req.failure(problem, what)
    return None


def requiretls_refusal(used: TLSUsed, offered: bool, relay: str) -> str | None:
    """RFC 8689 §5: a REQUIRETLS message goes only over a session verified by DANE or MTA-STS, to
    a server that offers REQUIRETLS itself. None when this session will do, else why not."""
    if used.level not in ("verified(dane)", "verified(mta-sts)"):
        return f"REQUIRETLS: the session with {relay} is not verified by DANE or MTA-STS (tls={used.level})"
    if not offered:
        return f"REQUIRETLS support required, but {relay} does not offer it"
    return None


def tls_required_no(body: bytes) -> bool:
    """Whether the message carries ``TLS-Required: No`` (RFC 8689 §4.2.1): the sender asks that TLS
    policy failures not stop it."""
    head = body.split(b"\r\n\r\n", 1)[0]
    lines = head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ").split(b"\r\n")
    for line in lines:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"tls-required":
            return value.strip().lower() == b"no"
    return False
