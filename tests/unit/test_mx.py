"""The pure parts of MX resolution (common/mx.py): ordering (RFC 5321 §5.1) and the rules driven
from a table, no DNS server; the destination syntax is tests/unit/test_smtp_hostport.py, the
rules against a real DNS server tests/integration/test_mx_dns.py."""

from __future__ import annotations

import random
from typing import Any

import dns.exception
import dns.rdatatype
import dns.resolver
import pytest

from common.mx import (
    DnsError,
    MXResolver,
    MXRules,
    Query,
    Target,
    make_async_resolver,
    make_resolver,
    order_mx,
    run_plan,
)

RECORDS = [(20, "c.test."), (10, "a.test."), (10, "b.test."), (10, "d.test."), (30, "e.test.")]


def test_order_mx_sorts_by_preference() -> None:
    ordered = order_mx(RECORDS, random.Random(1))
    assert set(ordered[:3]) == {"a.test.", "b.test.", "d.test."}
    assert ordered[3:] == ["c.test.", "e.test."]


def test_order_mx_shuffles_equal_preferences_but_never_across_levels() -> None:
    seen_first_levels = set()
    for seed in range(50):
        ordered = order_mx(RECORDS, random.Random(seed))
        assert ordered[3:] == ["c.test.", "e.test."], seed
        seen_first_levels.add(tuple(ordered[:3]))
    # 3 hosts at one preference: 6 orders, 50 seeds see most of them.
    assert len(seen_first_levels) >= 4


def test_order_mx_is_deterministic_for_a_seed() -> None:
    assert order_mx(RECORDS, random.Random(7)) == order_mx(RECORDS, random.Random(7))


def test_order_mx_dedupes_keeping_the_best_preference() -> None:
    records = [(20, "mx.test."), (10, "MX.test"), (10, "other.test."), (30, "mx.test.")]
    ordered = order_mx(records, random.Random(0))
    assert len(ordered) == 2
    assert {h.lower().rstrip(".") for h in ordered} == {"mx.test", "other.test"}


def test_order_mx_empty() -> None:
    assert order_mx([], random.Random(0)) == []


def test_ip_literal_needs_no_dns() -> None:
    # A resolver with no servers at all: an IP literal never asks it.
    resolver = MXResolver(make_resolver([("127.0.0.1", 9)], timeout=0.1))
    assert resolver.targets("[127.0.0.5]:2526", 25) == [Target("127.0.0.5", "127.0.0.5", 2526, 0)]
    assert resolver.targets("[::1]", 25) == [Target("::1", "::1", 25, 0)]


def test_bad_destination_is_a_configuration_error_that_defers() -> None:
    resolver = MXResolver(make_resolver([("127.0.0.1", 9)], timeout=0.1))
    with pytest.raises(DnsError) as e:
        resolver.targets("[host]:99999", 25)
    assert e.value.dsn == "4.3.5"


def test_target_str_is_postfix_relay_form() -> None:
    assert str(Target("mx1.a.test", "127.0.0.2", 25, 10)) == "mx1.a.test[127.0.0.2]:25"


def test_errors_carry_status_and_text() -> None:
    e = DnsError("5.1.2", "Host or domain name not found")
    assert (e.dsn, e.text) == ("5.1.2", "Host or domain name not found")
    assert "5.1.2" in str(e)


def test_make_resolver_uses_exactly_the_given_servers_with_cache() -> None:
    r = make_resolver([("127.0.0.1", 5353), ("127.0.0.2", 53)], timeout=0.5)
    assert [(ns.address, ns.port) for ns in r.nameservers] == [("127.0.0.1", 5353), ("127.0.0.2", 53)]  # type: ignore[union-attr]
    assert r.cache is not None
    assert r.timeout == 0.5
    assert r.lifetime == 1.0


# -- the rules without IO (common/mx.MXRules), answered from a table -----------------------------------

ZONE: dict[tuple[str, str], list[str] | str] = {
    ("a.test.", "MX"): ["10 mx1.a.test.", "10 mx2.a.test.", "20 mx3.a.test."],
    ("mx1.a.test.", "A"): ["192.0.2.1"],
    ("mx2.a.test.", "A"): ["192.0.2.2"],
    ("mx3.a.test.", "A"): ["192.0.2.3"],
    ("mx3.a.test.", "AAAA"): ["2001:db8::3"],
    ("null.test.", "MX"): ["0 ."],
    ("sf.test.", "MX"): "SERVFAIL",
    ("slow.test.", "MX"): "TIMEOUT",
    ("implicit.test.", "A"): ["192.0.2.9"],
    ("loop.test.", "MX"): ["10 me.example."],
    ("loopip.test.", "MX"): ["10 other.loopip.test."],
    ("other.loopip.test.", "A"): ["192.0.2.99"],
}
NAMES = {name for name, _ in ZONE}


class FakeDNS:
    """Answers from ZONE: a name it has without that type is NODATA, a name it lacks NXDOMAIN."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, q: Query) -> list[str]:
        name, rdtype = q.name.to_text(), dns.rdatatype.to_text(q.rdtype)
        self.asked.append(f"{name} {rdtype}")
        got = ZONE.get((name, rdtype), "NODATA" if name in NAMES else "NXDOMAIN")
        if got == "NODATA":
            raise dns.resolver.NoAnswer()  # type: ignore[no-untyped-call]
        if got == "NXDOMAIN":
            raise dns.resolver.NXDOMAIN()  # type: ignore[no-untyped-call]
        if got == "SERVFAIL":
            raise dns.resolver.NoNameservers()  # type: ignore[no-untyped-call]
        if got == "TIMEOUT":
            raise dns.exception.Timeout()  # type: ignore[no-untyped-call]
        assert isinstance(got, list)
        return got


def rules(seed: int = 0, **kw: Any) -> MXRules:
    return MXRules(local_names=["me.example"], local_ips=["192.0.2.99"], rng=random.Random(seed), **kw)


def test_rules_order_by_preference_and_shuffle_equal_ones() -> None:
    firsts = set()
    for seed in range(20):
        targets = run_plan(rules(seed).plan("a.test", 25), FakeDNS())
        assert sorted(t.hostname for t in targets[:2]) == ["mx1.a.test", "mx2.a.test"]
        assert [(t.hostname, t.ip) for t in targets[2:]] == [("mx3.a.test", "192.0.2.3"), ("mx3.a.test", "2001:db8::3")]
        firsts.add(targets[0].hostname)
    assert firsts == {"mx1.a.test", "mx2.a.test"}


def test_rules_stop_at_max_addresses_once_a_preference_level_is_complete() -> None:
    dns_ = FakeDNS()
    targets = run_plan(rules(max_addresses=2).plan("a.test", 25), dns_)
    assert len(targets) == 2 and {t.preference for t in targets} == {10}
    assert not any(q.startswith("mx3.") for q in dns_.asked)  # the backup is never looked up


@pytest.mark.parametrize(
    ("destination", "dsn", "asked"),
    [
        ("null.test", "5.1.10", ["null.test. MX"]),  # RFC 7505: no address asked
        ("nosuch.test", "5.1.2", ["nosuch.test. MX"]),  # NXDOMAIN: no A/AAAA after it
        ("sf.test", "4.4.3", ["sf.test. MX"]),
        ("slow.test", "4.4.3", ["slow.test. MX"]),
        ("loop.test", "5.4.6", ["loop.test. MX"]),  # an MX named like us: its address is not asked
        ("loopip.test", "5.4.6", ["loopip.test. MX", "other.loopip.test. A", "other.loopip.test. AAAA"]),
        ("[host]:0", "4.3.5", []),  # a bad next hop is the operator's to fix: deferred
    ],
)
def test_rules_refuse_with_the_status_both_sides_use(destination: str, dsn: str, asked: list[str]) -> None:
    dns_ = FakeDNS()
    with pytest.raises(DnsError) as e:
        run_plan(rules().plan(destination, 25), dns_)
    assert e.value.dsn == dsn
    assert dns_.asked == asked


def test_rules_implicit_mx() -> None:
    dns_ = FakeDNS()
    assert run_plan(rules().plan("implicit.test", 25), dns_) == [Target("implicit.test", "192.0.2.9", 25, 0)]
    assert dns_.asked == ["implicit.test. MX", "implicit.test. A", "implicit.test. AAAA"]


def test_rules_literal_ip_asks_nothing() -> None:
    dns_ = FakeDNS()
    assert run_plan(rules().plan("[192.0.2.5]:2526", 25), dns_) == [Target("192.0.2.5", "192.0.2.5", 2526, 0)]
    assert dns_.asked == []


def test_make_async_resolver_is_configured_as_the_blocking_one() -> None:
    sync = make_resolver([("127.0.0.1", 5353)], timeout=0.5)
    aio = make_async_resolver([("127.0.0.1", 5353)], timeout=0.5)
    assert [(ns.address, ns.port) for ns in aio.nameservers] == [(ns.address, ns.port) for ns in sync.nameservers]  # type: ignore[union-attr]
    assert (aio.timeout, aio.lifetime, aio.cache is not None) == (sync.timeout, sync.lifetime, True)
