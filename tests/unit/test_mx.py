"""The pure parts of MX resolution: ordering (RFC 5321 §5.1); the destination syntax is
tests/unit/test_smtp_hostport.py."""

from __future__ import annotations

import random

import pytest

from worker.mx import DnsError, MXResolver, Target, make_resolver, order_mx

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
