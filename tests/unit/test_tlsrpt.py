"""TLS-RPT (RFC 8460, worker/tlsrpt.py): counting sessions in Redis, the JSON report, the mail."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import time
from typing import Any

import fakeredis

from worker.tlspolicy import Failure, Requirement
from worker.tlsrpt import TLSReporter, build_report, day_of, parse_tlsrpt_txt, report_message

STS = Requirement("mta-sts", True, "a.test")
DANE = Requirement("dane", True, "b.test")


def test_parse_tlsrpt_txt() -> None:
    assert parse_tlsrpt_txt(["v=TLSRPTv1; rua=mailto:tls@a.test,https://r.a.test/x"]) == [
        "mailto:tls@a.test",
        "https://r.a.test/x",
    ]
    assert parse_tlsrpt_txt(["v=TLSRPTv1;rua=mailto:a%40b@a.test"]) == ["mailto:a@b@a.test"]
    assert parse_tlsrpt_txt(["v=TLSRPTv1; rua=ftp://x"]) == []
    assert parse_tlsrpt_txt(["v=TLSRPTv1; rua=mailto:a@a.test", "v=TLSRPTv1; rua=mailto:b@a.test"]) == []
    assert parse_tlsrpt_txt(["v=spf1 -all"]) == []


def test_sessions_counted_per_domain_and_day_into_one_report() -> None:
    r = fakeredis.FakeRedis(decode_responses=True)
    rep = TLSReporter(r)
    now = time.time()
    policy = ["version: STSv1", "mode: enforce", "mx: mx.a.test", "max_age: 86400"]
    rep.record(now, STS, "mx.a.test", None, policy)
    rep.record(now, STS, "mx.a.test", None, policy)
    rep.record(now, STS, "MX.evil.test.", Failure("certificate-not-trusted", "x"), policy)
    rep.record(now, Requirement(), "mx.c.test", None)  # no policy: nothing to report
    day = day_of(now)
    assert r.smembers(f"mtaq:tlsrpt:{day}") == {"a.test"}
    counts = {str(k): str(v) for k, v in r.hgetall(f"mtaq:tlsrpt:{day}:a.test").items()}
    report = build_report(day, "a.test", counts, "mtaq.example")
    assert report["report-id"] == f"{day}.a.test@mtaq.example"
    assert report["date-range"] == {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"}
    policies = report["policies"]
    assert isinstance(policies, list) and len(policies) == 1
    entry: dict[str, Any] = policies[0]
    assert entry["policy"] == {"policy-type": "sts", "policy-string": policy, "policy-domain": "a.test"}
    assert entry["summary"] == {"total-successful-session-count": 2, "total-failure-session-count": 1}
    assert entry["failure-details"] == [
        {"result-type": "certificate-not-trusted", "receiving-mx-hostname": "mx.evil.test", "failed-session-count": 1}
    ]
    assert int(r.ttl(f"mtaq:tlsrpt:{day}:a.test")) > 0


def test_report_mail_is_a_gzipped_tlsrpt_report() -> None:
    report = build_report("2026-12-05", "b.test", {"ok:tlsa": "3"}, "mtaq.example")
    msg = report_message(report, "b.test", ["tls@b.test"], "mtaq.example", 1_800_000_000.0)
    assert msg.envelope.sender == "tlsrpt-noreply@mtaq.example"
    assert [r.address for r in msg.envelope.recipients] == ["tls@b.test"]
    parsed = email.message_from_bytes(msg.body, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report" and parsed.get_param("report-type") == "tlsrpt"
    assert "Report Domain: b.test" in str(parsed["Subject"]) and parsed["TLS-Report-Domain"] == "b.test"
    part = next(p for p in parsed.walk() if p.get_content_type() == "application/tlsrpt+gzip")
    data = json.loads(gzip.decompress(part.get_payload(decode=True)))  # type: ignore[arg-type]
    assert data["policies"][0]["summary"]["total-successful-session-count"] == 3
    assert part.get_filename() == "mtaq.example!b.test!2026-12-05.json.gz"


def test_a_policy_fetch_failure_is_reported_without_an_mx() -> None:
    r = fakeredis.FakeRedis(decode_responses=True)
    TLSReporter(r).record(time.time(), STS, "", Failure("sts-policy-fetch-error", ""))
    day = day_of(time.time())
    counts = {str(k): str(v) for k, v in r.hgetall(f"mtaq:tlsrpt:{day}:a.test").items()}
    report = build_report(day, "a.test", counts, "mtaq.example")
    policies = report["policies"]
    assert isinstance(policies, list)
    assert policies[0]["failure-details"] == [{"result-type": "sts-policy-fetch-error", "failed-session-count": 1}]
