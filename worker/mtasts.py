"""MTA-STS (RFC 8461): a domain's policy, looked up, fetched, cached and matched.

Pure parts: the TXT record (``parse_txt``), the policy text (``parse_policy``), the ``mx`` patterns
(``mx_matches``). IO parts, small: ``fetch_policy`` (HTTPS to ``mta-sts.<domain>`` at the address
our own resolver gives, SNI and certificate checked for that name, no redirects, size and time
bounded, ``text/plain`` only), ``PolicyCache`` (one Redis string per domain, shared by every worker
on every host, expiring after the policy's ``max_age``) and ``MTASTS``, which applies §5.1:

- the TXT id equals the cached policy's: the cached policy, no fetch;
- a new id (or nothing cached): fetch; a good policy replaces the cache;
- the TXT record is gone, the DNS fails or the fetch fails: the cached policy stays in force until
  its max_age runs out (an attacker who blocks the fetch or strips the TXT record downgrades
  nothing); without one, delivery goes on as before.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import redis

from common.store import mta_sts_key

__all__ = [
    "MAX_AGE_LIMIT",
    "MAX_POLICY_SIZE",
    "MTASTS",
    "PolicyCache",
    "PolicyError",
    "STSPolicy",
    "fetch_policy",
    "mx_matches",
    "parse_policy",
    "parse_txt",
]

log = logging.getLogger("mtaq.tls")

MAX_POLICY_SIZE = 64 * 1024
"""Octets of policy text we read at most (RFC 8461 §3.3 leaves the limit to the sender; Postfix's
mta-sts resolver and KumoMTA take 64 KiB)."""
MAX_AGE_LIMIT = 31_557_600
"""RFC 8461 §3.2: max_age is at most 31557600 seconds (about one year)."""
FETCH_TIMEOUT = 10.0
"""Seconds one policy fetch may take in all (RFC 8461 §3.3: "a timeout ... 60 seconds" at most)."""
MEMO_TTL = 30.0
"""Seconds a worker process trusts what it looked up last (TXT and cache), sparing Redis and DNS."""
RETRY_AFTER_FAILURE = 300.0
"""Seconds before a worker process fetches again a policy whose fetch failed."""
WELL_KNOWN = "/.well-known/mta-sts.txt"

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MODES = ("enforce", "testing", "none")


class PolicyError(Exception):
    """No usable policy: ``result_type`` is RFC 8460's (sts-policy-fetch-error, sts-policy-invalid,
    sts-webpki-invalid)."""

    def __init__(self, result_type: str, text: str) -> None:
        super().__init__(text)
        self.result_type = result_type
        self.text = text


@dataclass(frozen=True, slots=True)
class STSPolicy:
    mode: str  # enforce, testing or none
    mx: tuple[str, ...]
    max_age: int
    id: str = ""  # the TXT record's id it was fetched under
    fetched: float = 0.0

    def allows(self, host: str) -> bool:
        return any(mx_matches(p, host) for p in self.mx)

    def to_json(self) -> str:
        return json.dumps(
            {"mode": self.mode, "mx": list(self.mx), "max_age": self.max_age, "id": self.id, "fetched": self.fetched}
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> STSPolicy:
        d = json.loads(raw)
        return cls(str(d["mode"]), tuple(str(m) for m in d["mx"]), int(d["max_age"]), str(d["id"]), float(d["fetched"]))


def parse_txt(strings: Iterable[str]) -> str | None:
    """The policy id of ``_mta-sts.<domain>``'s TXT records (RFC 8461 §3.1): exactly one record
    starting ``v=STSv1``, with an ``id`` of 1-32 letters and digits; None otherwise (no policy)."""
    found = [s for s in strings if s.startswith("v=STSv1")]
    if len(found) != 1:
        return None  # none, or several: "senders MUST assume ... no policy"
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key not in fields:
            fields[key.strip()] = value.strip()
    if fields.get("v") != "STSv1":
        return None
    ident = fields.get("id", "")
    return ident if _ID.fullmatch(ident) else None


def parse_policy(data: bytes) -> STSPolicy:
    """A policy from the text of ``mta-sts.txt`` (RFC 8461 §3.2). Raises PolicyError."""
    if len(data) > MAX_POLICY_SIZE:
        raise PolicyError("sts-policy-invalid", f"policy larger than {MAX_POLICY_SIZE} octets")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("sts-policy-invalid", "policy is not UTF-8 text") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError("sts-policy-invalid", "policy line without a colon")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        elif key not in fields:
            fields[key] = value  # the first of a repeated key wins; unknown keys are ignored
    if fields.get("version") != "STSv1":
        raise PolicyError("sts-policy-invalid", "policy version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in _MODES:
        raise PolicyError("sts-policy-invalid", f"policy mode {mode[:20]!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyError("sts-policy-invalid", "policy max_age is not a number of seconds")
    if mode != "none" and not mx:
        raise PolicyError("sts-policy-invalid", "policy names no mx")
    if any(not _pattern_ok(p) for p in mx):
        raise PolicyError("sts-policy-invalid", "policy has a malformed mx pattern")
    return STSPolicy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT))


def _pattern_ok(pattern: str) -> bool:
    labels = pattern.removeprefix("*.").split(".")
    return bool(pattern) and all(labels) and "*" not in "".join(labels)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: ``mail.example.com`` matches itself; ``*.example.com`` matches exactly one
    more label on the left (``mx1.example.com``, not ``example.com`` nor ``a.b.example.com``).
    Case and a trailing dot do not matter."""
    p = pattern.strip().rstrip(".").lower()
    h = host.strip().rstrip(".").lower()
    if not p or not h:
        return False
    if p.startswith("*."):
        first, dot, rest = h.partition(".")
        return bool(first and dot) and rest == p[2:]
    return h == p


def fetch_policy(
    domain: str,
    resolver: dns.resolver.Resolver,
    context: ssl.SSLContext,
    *,
    port: int = 443,
    timeout: float = FETCH_TIMEOUT,
) -> bytes:
    """The body of ``https://mta-sts.<domain>/.well-known/mta-sts.txt``. The address comes from
    ``resolver`` (the one that gave the MX), never from the system's; ``context`` checks the
    certificate for ``mta-sts.<domain>`` (SNI too). Redirects are refused (RFC 8461 §3.3); so is
    anything but 200 with ``text/plain``, and more than MAX_POLICY_SIZE octets. Raises PolicyError."""
    host = f"mta-sts.{domain}"
    deadline = time.monotonic() + timeout
    ips = _addresses(resolver, host)
    last: PolicyError | None = None
    for ip in ips[:3]:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            return _get(host, ip, port, context, left, deadline)
        except PolicyError as e:
            last = e
            if e.result_type == "sts-webpki-invalid":
                break  # a bad certificate is a verdict, not a reason to try elsewhere
    raise last or PolicyError("sts-policy-fetch-error", f"fetching the policy from {host} timed out")


def _addresses(resolver: dns.resolver.Resolver, host: str) -> list[str]:
    ips: list[str] = []
    errors: list[str] = []
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            answer = resolver.resolve(dns.name.from_text(host), rdtype, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue
        except dns.exception.DNSException as e:
            errors.append(type(e).__name__)
            continue
        ips.extend(rr.address for rr in answer)
    if not ips:
        why = f" ({', '.join(errors)})" if errors else ""
        raise PolicyError("sts-policy-fetch-error", f"policy host {host} has no address{why}")
    return ips


def _get(host: str, ip: str, port: int, context: ssl.SSLContext, timeout: float, deadline: float) -> bytes:
    where = f"https://{host}{WELL_KNOWN}"
    try:
        raw = socket.create_connection((ip, port), timeout=timeout)
    except OSError as e:
        why = e.strerror or e
        raise PolicyError("sts-policy-fetch-error", f"cannot connect to {host}[{ip}]:{port}: {why}") from None
    try:
        try:
            sock = context.wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError as e:
            raise PolicyError("sts-webpki-invalid", f"certificate of {host} not valid: {e.verify_message}") from None
        except (ssl.SSLError, OSError) as e:
            raise PolicyError("sts-policy-fetch-error", f"TLS with {host} failed: {e}") from None
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock  # http.client talks over our socket: connected to our address, verified
        try:
            conn.request("GET", WELL_KNOWN, headers={"Host": host, "User-Agent": "mtaq", "Connection": "close"})
            response = conn.getresponse()
            if response.status != 200:
                # 3xx included: RFC 8461 §3.3 "HTTP 3xx redirects MUST NOT be followed"
                raise PolicyError("sts-policy-fetch-error", f"{where} answered HTTP {response.status}")
            ctype = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "text/plain":
                raise PolicyError("sts-policy-invalid", f"{where} is not text/plain ({ctype[:40] or 'no type'})")
            body = bytearray()
            while len(body) <= MAX_POLICY_SIZE:
                if time.monotonic() > deadline:
                    raise PolicyError("sts-policy-fetch-error", f"fetching {where} timed out")
                chunk = response.read(16384)
                if not chunk:
                    break
                body += chunk
            if len(body) > MAX_POLICY_SIZE:
                raise PolicyError("sts-policy-invalid", f"{where} is larger than {MAX_POLICY_SIZE} octets")
            return bytes(body)
        except (OSError, http.client.HTTPException) as e:
            raise PolicyError("sts-policy-fetch-error", f"fetching {where} failed: {e or type(e).__name__}") from None
        finally:
            conn.close()
    finally:
        raw.close()


class PolicyCache:
    """The policies in force, one Redis string per domain (``mtaq:mta-sts:<domain>``) that expires
    with the policy's max_age: every worker on every host sees the same."""

    def __init__(self, r: redis.Redis) -> None:
        self.redis = r

    def get(self, domain: str) -> STSPolicy | None:
        raw = self.redis.get(mta_sts_key(domain))
        if raw is None:
            return None
        try:
            return STSPolicy.from_json(raw)
        except (ValueError, KeyError, TypeError):
            return None

    def put(self, domain: str, policy: STSPolicy) -> None:
        self.redis.set(mta_sts_key(domain), policy.to_json(), ex=max(1, policy.max_age))


class MTASTS:
    """The policy in force for a domain (RFC 8461 §5.1), shared through ``PolicyCache``."""

    def __init__(
        self,
        resolver: dns.resolver.Resolver,
        cache: PolicyCache,
        context: ssl.SSLContext,
        *,
        port: int = 443,
        clock: Callable[[], float] = time.time,
        fetch: Callable[[str], bytes] | None = None,
    ) -> None:
        self.resolver = resolver
        self.cache = cache
        self.context = context
        self.port = port
        self.clock = clock
        self._fetch = fetch or (lambda d: fetch_policy(d, self.resolver, self.context, port=self.port))
        self._memo: dict[str, tuple[float, STSPolicy | None]] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # domain -> (when, TXT id) of a failed fetch
        self._lock = threading.Lock()
        self.failures: list[tuple[str, PolicyError]] = []  # (domain, error) not yet taken (TLS-RPT)

    def policy(self, domain: str) -> STSPolicy | None:
        """The policy in force for ``domain`` (mode none included), or None. Never raises for
        DNS, HTTPS or Redis trouble: that keeps what was cached, or nothing."""
        key = domain.rstrip(".").lower()
        now = self.clock()
        with self._lock:
            memo = self._memo.get(key)
        if memo is not None and now < memo[0]:
            return memo[1]
        found = self._lookup(key, now)
        with self._lock:
            self._memo[key] = (now + MEMO_TTL, found)
        return found

    def _lookup(self, domain: str, now: float) -> STSPolicy | None:
        try:
            cached = self.cache.get(domain)
        except redis.RedisError:
            cached = None
            log.warning("%s: MTA-STS policy cache unavailable (Redis)", domain)
        ident = self._txt_id(domain)
        if ident is None or (cached is not None and cached.id == ident):
            return cached  # no (readable) TXT record: the cached policy stays until it expires
        with self._lock:
            failed = self._failed.get(domain)
        if failed is not None and failed[1] == ident and now - failed[0] < RETRY_AFTER_FAILURE:
            return cached
        try:
            fetched = parse_policy(self._fetch(domain))
        except PolicyError as e:
            kept = "; cached policy kept" if cached else ""
            log.warning("%s: MTA-STS policy fetch failed: %s%s", domain, e.text, kept)
            with self._lock:
                self._failed[domain] = (now, ident)
                del self.failures[: max(0, len(self.failures) - 99)]  # bounded if nobody takes them
                self.failures.append((domain, e))
            return cached
        policy = STSPolicy(fetched.mode, fetched.mx, fetched.max_age, ident, now)
        try:
            self.cache.put(domain, policy)
        except redis.RedisError:
            log.warning("%s: MTA-STS policy not cached (Redis unavailable)", domain)
        log.info("%s: MTA-STS policy id=%s mode=%s max_age=%d", domain, ident, policy.mode, policy.max_age)
        return policy

    def take_failures(self) -> list[tuple[str, PolicyError]]:
        """The fetch failures since the last call (for TLS-RPT)."""
        with self._lock:
            out, self.failures = self.failures, []
        return out

    def _txt_id(self, domain: str) -> str | None:
        try:
            answer = self.resolver.resolve(dns.name.from_text(f"_mta-sts.{domain}"), dns.rdatatype.TXT, search=False)
        except dns.exception.DNSException:
            return None  # NXDOMAIN, NODATA or a failure: all mean "keep what is cached"
        return parse_txt(_txt_strings(answer))


def _txt_strings(answer: Iterable[object]) -> Sequence[str]:
    out: list[str] = []
    for rr in answer:
        strings = getattr(rr, "strings", ())
        out.append(b"".join(strings).decode("utf-8", "replace"))
    return out
