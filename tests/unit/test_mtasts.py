"""MTA-STS (worker/mtasts.py): the TXT record, the policy text, mx patterns, and the cache rules of
RFC 8461 §5.1 (fakeredis, a stub resolver for the TXT record, a stub fetch)."""

from __future__ import annotations

import ssl
from typing import cast

import dns.name
import dns.resolver
import fakeredis
import pytest

from worker.mtasts import (
    MAX_AGE_LIMIT,
    MAX_POLICY_SIZE,
    MEMO_TTL,
    MTASTS,
    PolicyCache,
    PolicyError,
    STSPolicy,
    mx_matches,
    parse_policy,
    parse_txt,
)

GOOD = b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n"


def test_parse_txt() -> None:
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=STSv1;id=abc", "some other record"]) == "abc"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two: no policy
    assert parse_txt(["v=STSv1;"]) is None
    assert parse_txt(["v=STSv1; id=not-alnum"]) is None
    assert parse_txt(["v=STSv1; id=" + "a" * 33]) is None
    assert parse_txt(["v=spf1 -all"]) is None
    assert parse_txt([]) is None


def test_parse_good_policies() -> None:
    p = parse_policy(GOOD)
    assert (p.mode, p.mx, p.max_age) == ("enforce", ("mail.example.com", "*.example.net"), 604800)
    lf = parse_policy(b"version: STSv1\nmode: testing\nmx: MX.Example.COM.\nmax_age: 86400\nfuture: x\n")
    assert (lf.mode, lf.mx) == ("testing", ("mx.example.com",))
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 1\n").mode == "none"
    capped = parse_policy(b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 9999999999\n")
    assert capped.max_age == MAX_AGE_LIMIT


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
        b"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
        b"version: STSv1\nmode: enforce\nmx: a.test\n",  # no max_age
        b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -5\n",
        b"version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 1\n",
        b"version: STSv1\nthis line has no colon\n",
        b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n\xff\n",
        b"<html>redirected to a login page</html>",
    ],
)
def test_bad_policies_are_refused(text: bytes) -> None:
    with pytest.raises(PolicyError) as e:
        parse_policy(text)
    assert e.value.result_type == "sts-policy-invalid"


def test_oversized_policy_is_refused() -> None:
    huge = GOOD + b"x-padding: " + b"a" * MAX_POLICY_SIZE + b"\n"
    with pytest.raises(PolicyError, match="larger than"):
        parse_policy(huge)


@pytest.mark.parametrize(
    ("pattern", "host", "match"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.com.", True),
        ("mail.example.com", "mx.example.com", False),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", "mx1.example.org", False),
        ("*.example.com", ".example.com", False),
        ("", "example.com", False),
    ],
)
def test_mx_matches(pattern: str, host: str, match: bool) -> None:
    assert mx_matches(pattern, host) is match


class FakeTXT:
    """Answers ``_mta-sts.<domain>`` TXT from a dict; a missing name is NXDOMAIN, ``fail`` SERVFAIL."""

    def __init__(self) -> None:
        self.records: dict[str, str] = {}
        self.fail = False

    def resolve(self, qname: dns.name.Name, rdtype: object, search: bool = False) -> list[object]:
        if self.fail:
            raise dns.resolver.NoNameservers()  # type: ignore[no-untyped-call]
        text = self.records.get(qname.to_text(omit_final_dot=True))
        if text is None:
            raise dns.resolver.NXDOMAIN()  # type: ignore[no-untyped-call]
        return [type("TXT", (), {"strings": (text.encode(),)})()]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make(policy_text: dict[str, bytes]) -> tuple[MTASTS, FakeTXT, Clock, list[str], fakeredis.FakeRedis]:
    txt, clock, fetched = FakeTXT(), Clock(), []
    r = fakeredis.FakeRedis()

    def fetch(domain: str) -> bytes:
        fetched.append(domain)
        if domain not in policy_text:
            raise PolicyError("sts-policy-fetch-error", "connection refused")
        return policy_text[domain]

    sts = MTASTS(
        cast(dns.resolver.Resolver, txt), PolicyCache(r), ssl.create_default_context(), clock=clock, fetch=fetch
    )
    return sts, txt, clock, fetched, r


def test_no_txt_record_no_policy() -> None:
    sts, _, _, fetched, _ = make({})
    assert sts.policy("example.com") is None and fetched == []


def test_policy_is_fetched_cached_and_shared() -> None:
    served = {"example.com": GOOD}
    sts, txt, clock, fetched, r = make(served)
    txt.records["_mta-sts.example.com"] = "v=STSv1; id=1"
    p = sts.policy("example.com")
    assert p is not None and p.mode == "enforce" and p.id == "1" and fetched == ["example.com"]
    assert 0 < int(r.ttl("mtaq:mta-sts:example.com")) <= 604800
    # another worker (same Redis) with the same TXT id takes it from the cache, no fetch
    other, other_txt, _, other_fetched, _ = make({})
    other.cache = PolicyCache(r)
    other_txt.records["_mta-sts.example.com"] = "v=STSv1; id=1"
    assert other.policy("example.com") == p and other_fetched == []
    # a new id: fetched again
    served["example.com"] = GOOD.replace(b"enforce", b"testing")
    txt.records["_mta-sts.example.com"] = "v=STSv1; id=2"
    clock.now += MEMO_TTL + 1
    p2 = sts.policy("example.com")
    assert p2 is not None and (p2.mode, p2.id) == ("testing", "2") and len(fetched) == 2


def test_a_failed_refresh_or_a_stripped_txt_never_downgrades() -> None:
    served = {"example.com": GOOD}
    sts, txt, clock, _, _ = make(served)
    txt.records["_mta-sts.example.com"] = "v=STSv1; id=1"
    first = sts.policy("example.com")
    assert first is not None
    # the attacker blocks the policy server and announces a new id: the cached policy stays
    del served["example.com"]
    txt.records["_mta-sts.example.com"] = "v=STSv1; id=2"
    clock.now += MEMO_TTL + 1
    assert sts.policy("example.com") == first
    assert [e.result_type for _, e in sts.failures] == ["sts-policy-fetch-error"]
    # ... strips the TXT record, or breaks DNS: still the cached policy
    del txt.records["_mta-sts.example.com"]
    clock.now += MEMO_TTL + 1
    assert sts.policy("example.com") == first
    txt.fail = True
    clock.now += MEMO_TTL + 1
    assert sts.policy("example.com") == first
    # a bad policy text does not replace a good one either
    txt.fail = False
    served["example.com"] = b"garbage"
    txt.records["_mta-sts.example.com"] = "v=STSv1; id=3"
    clock.now += MEMO_TTL + 1
    assert sts.policy("example.com") == first


def test_fetch_failure_without_cache_delivers_as_before_and_is_not_retried_at_once() -> None:
    sts, txt, clock, fetched, _ = make({})
    txt.records["_mta-sts.example.com"] = "v=STSv1; id=1"
    assert sts.policy("example.com") is None
    clock.now += MEMO_TTL + 1
    assert sts.policy("example.com") is None
    assert fetched == ["example.com"]  # RETRY_AFTER_FAILURE spares the policy server


def test_cached_json_round_trips() -> None:
    p = STSPolicy("enforce", ("a.test", "*.b.test"), 60, "x1", 5.0)
    assert STSPolicy.from_json(p.to_json()) == p


def test_fetch_failures_are_taken_once_for_tls_rpt() -> None:
    sts, txt, _, _, _ = make({})
    txt.records["_mta-sts.example.com"] = "v=STSv1; id=1"
    sts.policy("example.com")
    assert [(d, e.result_type) for d, e in sts.take_failures()] == [("example.com", "sts-policy-fetch-error")]
    assert sts.take_failures() == []
