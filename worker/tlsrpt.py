"""SMTP TLS Reporting (RFC 8460): what our sessions with a policy domain's MX hosts met, counted per
domain and UTC day in Redis, and the daily JSON report to the addresses the domain publishes.

Counting (``TLSReporter.record``, one HINCRBY per new connection to a domain with a policy): a
hash ``mtaq:tlsrpt:<day>:<domain>`` holds ``ok:<type>`` and ``fail:<type>:<result>:<mx host>``
counters and ``policy:<type>`` (the policy as the report shows it); a set
``mtaq:tlsrpt:<day>`` names the day's domains. Both expire after a few days.

Sending (``send_reports``, from `mtaq tlsrpt send [--date D]` and once a day from the worker's
sweep): for each domain counted that day whose ``_smtp._tls.<domain>`` TXT record names ``rua``
addresses, the report gzipped (``application/tlsrpt+gzip``) goes to its ``mailto:`` addresses as a
``multipart/report; report-type="tlsrpt"`` message through our own queue, and by HTTPS POST to
its ``https:`` ones.
"""

from __future__ import annotations

import datetime
import email.utils
import gzip
import http.client
import json
import logging
import socket
import ssl
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import redis

from common.envelope import Envelope, Recipient, new_queue_id
from common.store import Message, tlsrpt_domains_key, tlsrpt_key, tlsrpt_sent_key
from worker.tlspolicy import Failure, Requirement

__all__ = [
    "Sent",
    "TLSReporter",
    "build_report",
    "parse_tlsrpt_txt",
    "report_message",
    "send_daily",
    "send_reports",
]

log = logging.getLogger("mtaq.tls")

KEEP_DAYS = 8  # how long a day's counts stay in Redis (a missed report can still be sent)
POST_TIMEOUT = 30.0
POLICY_TYPES = {"dane": "tlsa", "mta-sts": "sts"}


def day_of(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d")


class TLSReporter:
    """Counts sessions for TLS-RPT; never raises (a report is not worth a delivery)."""

    def __init__(self, r: redis.Redis) -> None:
        self.redis = r

    def record(
        self, when: float, req: Requirement, mx_host: str, failure: Failure | None, policy: Sequence[str] = ()
    ) -> None:
        kind = POLICY_TYPES.get(req.policy)
        if kind is None or not req.domain:
            return
        day, key = day_of(when), tlsrpt_key(day_of(when), req.domain)
        mx = mx_host.rstrip(".").lower()
        field = f"ok:{kind}" if failure is None else f"fail:{kind}:{failure.result_type}:{mx}"
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(key, field, 1)
            if policy:
                pipe.hset(key, f"policy:{kind}", json.dumps(list(policy)))
            pipe.sadd(tlsrpt_domains_key(day), req.domain)
            pipe.expire(key, KEEP_DAYS * 86400)
            pipe.expire(tlsrpt_domains_key(day), KEEP_DAYS * 86400)
            pipe.execute()
        except redis.RedisError as e:
            log.debug("TLS-RPT count lost: %s", e)


def parse_tlsrpt_txt(strings: Iterable[str]) -> list[str]:
    """The ``rua`` URIs of ``_smtp._tls.<domain>`` (RFC 8460 §3): exactly one ``v=TLSRPTv1``
    record; only mailto: and https: URIs are used."""
    found = [s for s in strings if s.replace(" ", "").startswith("v=TLSRPTv1")]
    if len(found) != 1:
        return []
    for part in found[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key.strip() == "rua":
            uris = [urllib.parse.unquote(u.strip()) for u in value.split(",")]
            return [u for u in uris if u.lower().startswith(("mailto:", "https://"))]
    return []


def build_report(day: str, domain: str, counts: dict[str, str], hostname: str) -> dict[str, object]:
    """The RFC 8460 §4 report of one policy domain for one UTC day, from its counters."""
    policies: dict[str, dict[str, object]] = {}
    for field, value in counts.items():
        parts = field.split(":", 3)
        if parts[0] not in ("ok", "fail"):
            continue
        kind = parts[1]
        entry = policies.setdefault(kind, {"ok": 0, "fail": 0, "details": {}})
        n = int(value)
        if parts[0] == "ok":
            entry["ok"] = int(str(entry["ok"])) + n
        elif len(parts) == 4:
            entry["fail"] = int(str(entry["fail"])) + n
            details = entry["details"]
            assert isinstance(details, dict)
            details[(parts[2], parts[3])] = details.get((parts[2], parts[3]), 0) + n
    out = []
    for kind, entry in sorted(policies.items()):
        strings = json.loads(counts.get(f"policy:{kind}", "[]"))
        details = entry["details"]
        assert isinstance(details, dict)
        out.append(
            {
                "policy": {"policy-type": kind, "policy-string": strings, "policy-domain": domain},
                "summary": {
                    "total-successful-session-count": entry["ok"],
                    "total-failure-session-count": entry["fail"],
                },
                "failure-details": [
                    {"result-type": result, "failed-session-count": n} | ({"receiving-mx-hostname": mx} if mx else {})
                    for (result, mx), n in sorted(details.items())
                ],
            }
        )
    return {
        "organization-name": hostname,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": f"postmaster@{hostname}",
        "report-id": f"{day}.{domain}@{hostname}",
        "policies": out,
    }


def report_message(report: dict[str, object], domain: str, to: Sequence[str], hostname: str, now: float) -> Message:
    """The report as mail (RFC 8460 §5.3): multipart/report; report-type="tlsrpt", the JSON gzipped."""
    sender = f"tlsrpt-noreply@{hostname}"
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = f"Report Domain: {domain} Submitter: {hostname} Report-ID: <{report['report-id']}>"
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = hostname
    msg["Date"] = email.utils.formatdate(now)
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@{hostname}>"
    msg.set_content(f"This is an aggregate TLS report from {hostname} for {domain} (RFC 8460).\n")
    day = str(report["report-id"]).split(".", 1)[0]
    msg.add_attachment(
        gzip.compress(json.dumps(report).encode()),
        maintype="application",
        subtype="tlsrpt+gzip",
        filename=f"{hostname}!{domain}!{day}.json.gz",
    )
    msg.set_type("multipart/report")
    msg.set_param("report-type", "tlsrpt")
    body = msg.as_bytes(policy=SMTP)
    env = Envelope(new_queue_id(), sender, [Recipient(a) for a in to], received_at=now, protocol="local")
    return Message(env, body)


@dataclass(frozen=True, slots=True)
class Sent:
    domain: str
    mailto: tuple[str, ...]
    https: tuple[str, ...]
    problems: tuple[str, ...] = ()


def send_reports(
    day: str,
    r: redis.Redis,
    resolver: dns.resolver.Resolver,
    hostname: str,
    now: float,
    *,
    queue: Callable[[list[Message]], object],
    context: ssl.SSLContext | None = None,
) -> list[Sent]:
    """Send the reports of ``day``; ``queue`` is a callable taking the report messages (the spool's
    commit). Returns what went where."""
    out: list[Sent] = []
    messages: list[Message] = []
    for raw in sorted(r.smembers(tlsrpt_domains_key(day))):
        domain = raw.decode() if isinstance(raw, bytes) else str(raw)
        counts = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in r.hgetall(tlsrpt_key(day, domain)).items()
        }
        rua = _rua(resolver, domain)
        if not rua or not counts:
            continue
        report = build_report(day, domain, counts, hostname)
        mailto = tuple(u[7:].split("?", 1)[0] for u in rua if u.lower().startswith("mailto:"))
        https = tuple(u for u in rua if u.lower().startswith("https://"))
        if mailto:
            messages.append(report_message(report, domain, mailto, hostname, now))
        data = gzip.compress(json.dumps(report).encode())
        problems = tuple(p for u in https if (p := _post(u, data, resolver, context)))
        out.append(Sent(domain, mailto, https, problems))
    if messages:
        queue(messages)
    return out


def _rua(resolver: dns.resolver.Resolver, domain: str) -> list[str]:
    try:
        answer = resolver.resolve(dns.name.from_text(f"_smtp._tls.{domain}"), dns.rdatatype.TXT, search=False)
    except dns.exception.DNSException:
        return []
    return parse_tlsrpt_txt(b"".join(getattr(rr, "strings", ())).decode("utf-8", "replace") for rr in answer)


def _post(url: str, data: bytes, resolver: dns.resolver.Resolver, context: ssl.SSLContext | None) -> str:
    """POST the report (RFC 8460 §5.4) to the address our resolver gives, the certificate checked
    for the URL's host; '' when the server took it, else why not."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        answer = resolver.resolve(dns.name.from_text(host), dns.rdatatype.A, search=False)
        ip = next(iter(answer)).address
        raw = socket.create_connection((ip, parts.port or 443), timeout=POST_TIMEOUT)
        ctx = context or ssl.create_default_context()
        with ctx.wrap_socket(raw, server_hostname=host) as sock:
            conn = http.client.HTTPConnection(host, parts.port or 443, timeout=POST_TIMEOUT)
            conn.sock = sock
            conn.request("POST", parts.path or "/", body=data, headers={"Content-Type": "application/tlsrpt+gzip"})
            status = conn.getresponse().status
    except (OSError, http.client.HTTPException, dns.exception.DNSException, StopIteration) as e:
        return f"{url}: {e or type(e).__name__}"
    return "" if 200 <= status < 300 else f"{url}: HTTP {status}"


def send_daily(
    r: redis.Redis,
    resolver: dns.resolver.Resolver,
    hostname: str,
    now: float,
    *,
    queue: Callable[[list[Message]], object],
    context: ssl.SSLContext | None = None,
) -> list[Sent] | None:
    """Yesterday's reports (UTC), by whichever worker gets there first (a Redis key per day);
    None when another worker did or does."""
    day = day_of(now - 86400)
    if not r.set(tlsrpt_sent_key(day), hostname, nx=True, ex=KEEP_DAYS * 86400):
        return None
    sent = send_reports(day, r, resolver, hostname, now, queue=queue, context=context)
    for s in sent:
        log.info("TLS-RPT report for %s (%s) sent to %s", s.domain, day, ", ".join([*s.mailto, *s.https]))
    return sent
