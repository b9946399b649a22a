"""MX resolution against a real DNS server on loopback (tests/dnsserver.py), rule by rule."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from common.mx import AsyncMXResolver, DnsError, MXResolver, Target, make_async_resolver, make_resolver
from tests.dnsserver import ZoneServer
from tests.integration.eventually import GENEROUS

PORT = 2525
# The zone server answers in milliseconds, but a loaded machine can delay its thread past any short
# timeout, and a lost answer changes the verdict (a timed-out A lookup of the primary MX made
# backup.test look like "only us"). So every lookup that expects an answer may wait GENEROUS; only
# the silent name (timeout.test) is asked with a short timeout, the behaviour under test.
ANSWER_TIMEOUT = GENEROUS
SILENT_TIMEOUT = 0.5

RECORDS: dict[str, list[tuple[str, str]]] = {
    # two MX at 10 and a backup at 20
    "a.test.": [("MX", "10 mx1.a.test."), ("MX", "10 mx2.a.test."), ("MX", "20 mx3.a.test.")],
    "mx1.a.test.": [("A", "127.0.0.2")],
    "mx2.a.test.": [("A", "127.0.0.3")],
    "mx3.a.test.": [("A", "127.0.0.4"), ("AAAA", "::1")],
    # no MX: the domain's own addresses
    "implicit.test.": [("A", "127.0.0.6"), ("AAAA", "::1"), ("TXT", '"v=spf1 -all"')],
    "nothing.test.": [("TXT", '"exists, no mail"')],
    # RFC 7505
    "null.test.": [("MX", "0 .")],
    # MX hosts that do not resolve
    "broken.test.": [("MX", "10 gone1.broken.test."), ("MX", "20 gone2.broken.test.")],
    "half.test.": [("MX", "10 gone.half.test."), ("MX", "20 mx.half.test.")],
    "mx.half.test.": [("A", "127.0.0.7")],
    "noaddr.test.": [("MX", "10 bare.noaddr.test.")],
    "bare.noaddr.test.": [("TXT", '"no addresses"')],
    "flaky.test.": [("MX", "10 sf.flaky.test."), ("MX", "20 gone.flaky.test.")],
    "sf.flaky.test.": [("A", "127.0.0.8")],
    "v6fail.test.": [("MX", "10 mx.v6fail.test.")],
    "mx.v6fail.test.": [("A", "127.0.0.9")],
    # loops
    "loop.test.": [("MX", "10 me.example.")],
    "me.example.": [("A", "127.0.0.1")],
    "loopip.test.": [("MX", "10 other-name.loopip.test.")],
    "other-name.loopip.test.": [("A", "127.0.0.1")],
    "backup.test.": [("MX", "10 primary.backup.test."), ("MX", "20 me.example.")],
    "primary.backup.test.": [("A", "127.0.0.2")],
    "tie.test.": [("MX", "10 primary.backup.test."), ("MX", "10 me.example.")],
    # many addresses
    "many.test.": [("MX", "10 m1.many.test."), ("MX", "20 m2.many.test.")],
    "m1.many.test.": [("A", f"127.0.1.{i}") for i in range(1, 4)],
    "m2.many.test.": [("A", f"127.0.2.{i}") for i in range(1, 4)],
    "big.test.": [("A", f"127.0.3.{i}") for i in range(1, 61)],
    # an MX naming an IP address (malformed), alone and beside a real one
    "numeric.test.": [("MX", "10 192.0.2.1.")],
    "numeric2.test.": [("MX", "10 192.0.2.1."), ("MX", "20 mx1.a.test.")],
    # an MX host with only an IPv6 address
    "v6only.test.": [("MX", "10 mx.v6only.test.")],
    "mx.v6only.test.": [("AAAA", "::1")],
    # CNAME chain to an MX host
    "chain.test.": [("MX", "10 c1.chain.test.")],
    "c1.chain.test.": [("CNAME", "c2.chain.test.")],
    "c2.chain.test.": [("CNAME", "mx2.a.test.")],
    # CNAME to an MX host
    "alias.test.": [("MX", "10 mail.alias.test.")],
    "mail.alias.test.": [("CNAME", "mx1.a.test.")],
}


@pytest.fixture(scope="module")
def zone() -> Iterator[ZoneServer]:
    with ZoneServer(RECORDS) as z:
        z.servfail.update({"servfail.test", "sf.flaky.test", "mx.v6fail.test./AAAA"})
        z.drop.add("timeout.test.")
        yield z
        assert not z.errors


def mx(zone: ZoneServer, timeout: float = ANSWER_TIMEOUT, **kw: object) -> MXResolver:
    """A fresh resolver (empty cache) on the zone server."""
    return MXResolver(make_resolver([zone.address], timeout=timeout), **kw)


def hosts(targets: list[Target]) -> list[str]:
    return [t.hostname for t in targets]


# -- MX records


def test_mx_sorted_by_preference_with_equal_ones_shuffled(zone: ZoneServer) -> None:
    firsts = set()
    for seed in range(20):
        targets = mx(zone, rng=random.Random(seed)).targets("a.test", PORT)
        assert sorted(hosts(targets)[:2]) == ["mx1.a.test", "mx2.a.test"]
        assert hosts(targets)[2:] == ["mx3.a.test", "mx3.a.test"]
        assert [t.preference for t in targets] == [10, 10, 20, 20]
        assert all(t.port == PORT for t in targets)
        firsts.add(targets[0].hostname)
    assert firsts == {"mx1.a.test", "mx2.a.test"}


def test_a_before_aaaa(zone: ZoneServer) -> None:
    targets = mx(zone).targets("a.test", PORT)
    assert [t.ip for t in targets if t.hostname == "mx3.a.test"] == ["127.0.0.4", "::1"]


def test_names_are_case_and_dot_insensitive(zone: ZoneServer) -> None:
    assert len(mx(zone).targets("A.TEST.", PORT)) == 4


def test_cname_to_an_mx_host_is_followed(zone: ZoneServer) -> None:
    assert mx(zone).targets("alias.test", PORT) == [Target("mail.alias.test", "127.0.0.2", PORT, 10)]


# -- implicit MX, null MX, NXDOMAIN


def test_no_mx_means_the_domain_itself(zone: ZoneServer) -> None:
    assert mx(zone).targets("implicit.test", PORT) == [
        Target("implicit.test", "127.0.0.6", PORT, 0),
        Target("implicit.test", "::1", PORT, 0),
    ]


def test_no_mx_and_no_address_is_unroutable(zone: ZoneServer) -> None:
    with pytest.raises(DnsError) as e:
        mx(zone).targets("nothing.test", PORT)
    assert e.value.dsn == "5.4.4"


def test_null_mx_bounces_at_once(zone: ZoneServer) -> None:
    with pytest.raises(DnsError) as e:
        mx(zone).targets("null.test", PORT)
    assert e.value.dsn == "5.1.10"
    assert "null.test" in e.value.text


def test_nxdomain_bounces(zone: ZoneServer) -> None:
    before = zone.query_count("nosuch.test")
    with pytest.raises(DnsError) as e:
        mx(zone).targets("nosuch.test", PORT)
    assert e.value.dsn == "5.1.2"
    assert "name=nosuch.test type=MX: Host not found" in e.value.text
    assert zone.query_count("nosuch.test") == before + 1  # no A/AAAA asked after NXDOMAIN


# -- transient failures


def test_servfail_defers(zone: ZoneServer) -> None:
    with pytest.raises(DnsError) as e:
        mx(zone).targets("servfail.test", PORT)
    assert e.value.dsn == "4.4.3"


def test_timeout_defers(zone: ZoneServer) -> None:
    resolver = mx(zone, timeout=SILENT_TIMEOUT)
    # the whole lookup gives up after the configured timeout, not dnspython's default lifetime
    assert resolver.resolver.lifetime == SILENT_TIMEOUT
    started = time.monotonic()
    with pytest.raises(DnsError) as e:
        resolver.targets("timeout.test", PORT)
    assert e.value.dsn == "4.4.3"
    assert "timed out" in e.value.text
    assert time.monotonic() - started >= SILENT_TIMEOUT * 0.9  # it did wait (a lower bound only)


def test_no_dns_server_at_all_defers() -> None:
    resolver = MXResolver(make_resolver([("127.0.0.1", 9)], timeout=0.3))  # discard port: refused / silent
    with pytest.raises(DnsError) as e:
        resolver.targets("a.test", PORT)
    assert e.value.dsn == "4.4.3"


# -- MX hosts that do not resolve


def test_unresolvable_mx_host_is_skipped(zone: ZoneServer) -> None:
    assert mx(zone).targets("half.test", PORT) == [Target("mx.half.test", "127.0.0.7", PORT, 20)]


def test_all_mx_hosts_nxdomain_is_unroutable(zone: ZoneServer) -> None:
    with pytest.raises(DnsError) as e:
        mx(zone).targets("broken.test", PORT)
    assert e.value.dsn == "5.4.4"
    assert "Unable to route" in e.value.text


def test_mx_host_without_addresses_is_unroutable(zone: ZoneServer) -> None:
    with pytest.raises(DnsError) as e:
        mx(zone).targets("noaddr.test", PORT)
    assert e.value.dsn == "5.4.4"


def test_a_transient_host_failure_outweighs_permanent_ones(zone: ZoneServer) -> None:
    with pytest.raises(DnsError) as e:
        mx(zone).targets("flaky.test", PORT)
    assert e.value.dsn == "4.4.3"


def test_aaaa_failure_does_not_spoil_a(zone: ZoneServer) -> None:
    assert mx(zone).targets("v6fail.test", PORT) == [Target("mx.v6fail.test", "127.0.0.9", PORT, 10)]


# -- mail that would come back to us


def test_mx_host_named_like_us_is_a_loop(zone: ZoneServer) -> None:
    with pytest.raises(DnsError) as e:
        mx(zone, local_names=["ME.example."]).targets("loop.test", PORT)
    assert (e.value.dsn, e.value.text) == ("5.4.6", "mail for loop.test loops back to myself")


def test_mx_host_on_our_address_is_a_loop(zone: ZoneServer) -> None:
    with pytest.raises(DnsError) as e:
        mx(zone, local_ips=["127.0.0.1"]).targets("loopip.test", PORT)
    assert e.value.dsn == "5.4.6"


def test_implicit_mx_on_our_address_is_a_loop(zone: ZoneServer) -> None:
    with pytest.raises(DnsError) as e:
        mx(zone, local_ips=["127.0.0.6"]).targets("implicit.test", PORT)
    assert e.value.dsn == "5.4.6"


def test_as_backup_mx_we_use_only_the_better_ones(zone: ZoneServer) -> None:
    targets = mx(zone, local_names=["me.example"]).targets("backup.test", PORT)
    assert targets == [Target("primary.backup.test", "127.0.0.2", PORT, 10)]


def test_as_backup_mx_a_better_mx_we_cannot_resolve_now_defers_not_loops(zone: ZoneServer) -> None:
    # The primary's address lookup times out: we cannot tell whether a better MX exists, so the
    # mail waits (4.4.3) rather than bouncing as a loop (5.4.6).
    zone.drop.add("primary.backup.test.")
    try:
        with pytest.raises(DnsError) as e:
            mx(zone, timeout=SILENT_TIMEOUT, local_names=["me.example"]).targets("backup.test", PORT)
        assert e.value.dsn == "4.4.3"
    finally:
        zone.drop.discard("primary.backup.test.")


def test_us_at_the_best_preference_is_a_loop_even_beside_others(zone: ZoneServer) -> None:
    for seed in range(6):  # whichever order the shuffle picks
        with pytest.raises(DnsError) as e:
            mx(zone, local_names=["me.example"], rng=random.Random(seed)).targets("tie.test", PORT)
        assert e.value.dsn == "5.4.6"


def test_not_us_is_not_a_loop(zone: ZoneServer) -> None:
    assert hosts(mx(zone, local_names=["other.example"], local_ips=["127.0.0.99"]).targets("loop.test", PORT)) == [
        "me.example"
    ]


# -- literals: no MX lookup


def test_ip_literal_with_port(zone: ZoneServer) -> None:
    before = len(zone.queries)
    assert mx(zone).targets("[127.0.0.5]:2526", PORT) == [Target("127.0.0.5", "127.0.0.5", 2526, 0)]
    assert len(zone.queries) == before


def test_ip_literal_is_never_a_loop(zone: ZoneServer) -> None:
    # A content filter or smarthost on our own address is an explicit choice (Postfix does the same).
    assert mx(zone, local_ips=["127.0.0.5"]).targets("[127.0.0.5]", PORT)[0].port == PORT


def test_host_literal_uses_addresses_not_mx(zone: ZoneServer) -> None:
    before_mx = zone.query_count("mx3.a.test", "MX")
    targets = mx(zone).targets("[mx3.a.test]:2526", PORT)
    assert targets == [Target("mx3.a.test", "127.0.0.4", 2526, 0), Target("mx3.a.test", "::1", 2526, 0)]
    assert zone.query_count("mx3.a.test", "MX") == before_mx


def test_domain_with_port_still_looks_up_mx(zone: ZoneServer) -> None:
    targets = mx(zone).targets("a.test:2600", PORT)
    assert len(targets) == 4 and {t.port for t in targets} == {2600}


def test_host_literal_that_does_not_exist(zone: ZoneServer) -> None:
    with pytest.raises(DnsError) as e:
        mx(zone).targets("[nosuch.test]", PORT)
    assert e.value.dsn == "5.4.4"


# -- limits, caching, the server itself


def test_at_most_max_addresses(zone: ZoneServer) -> None:
    targets = mx(zone).targets("many.test", PORT)
    assert hosts(targets) == ["m1.many.test"] * 3 + ["m2.many.test"] * 2
    assert {t.ip for t in targets[:3]} == {"127.0.1.1", "127.0.1.2", "127.0.1.3"}
    assert len(mx(zone, max_addresses=2).targets("many.test", PORT)) == 2
    assert len(mx(zone, max_addresses=20).targets("many.test", PORT)) == 6


def test_large_answer_falls_back_to_tcp(zone: ZoneServer) -> None:
    targets = mx(zone, max_addresses=100).targets("[big.test]", PORT)
    assert len(targets) == 60
    assert any(q.name == "big.test." and q.transport == "tcp" for q in zone.queries)


def test_answers_are_cached(zone: ZoneServer) -> None:
    resolver = mx(zone)
    resolver.targets("a.test", PORT)
    with pytest.raises(DnsError):
        resolver.targets("nosuch2.test", PORT)
    before = len(zone.queries)
    resolver.targets("a.test", PORT)
    with pytest.raises(DnsError):
        resolver.targets("nosuch2.test", PORT)
    assert len(zone.queries) == before


def test_records_added_at_runtime(zone: ZoneServer) -> None:
    zone.add("late.test.", "MX", "5 mx1.a.test.")
    try:
        assert mx(zone).targets("late.test", PORT) == [Target("mx1.a.test", "127.0.0.2", PORT, 5)]
    finally:
        zone.remove("late.test.")


# -- issue 8: DNS as a real MTA does it


def test_an_mx_that_is_an_ip_address_is_malformed(zone: ZoneServer) -> None:
    with pytest.raises(DnsError) as e:
        mx(zone).targets("numeric.test", PORT)
    assert e.value.dsn == "5.4.4" and "is an IP address" in e.value.text


def test_a_malformed_mx_beside_a_good_one_is_skipped(zone: ZoneServer) -> None:
    assert [t.ip for t in mx(zone).targets("numeric2.test", PORT)] == ["127.0.0.2"]


def test_an_mx_host_with_only_aaaa_is_used(zone: ZoneServer) -> None:
    assert [(t.hostname, t.ip) for t in mx(zone).targets("v6only.test", PORT)] == [("mx.v6only.test", "::1")]


def test_a_cname_chain_is_followed(zone: ZoneServer) -> None:
    assert [t.ip for t in mx(zone).targets("chain.test", PORT)] == ["127.0.0.3"]


def test_ipv6_addresses_are_tried_after_ipv4_ones(zone: ZoneServer) -> None:
    targets = mx(zone).targets("implicit.test", PORT)
    assert [t.ip for t in targets] == ["127.0.0.6", "::1"]


def test_loop_detection_by_the_address_we_listen_on(zone: ZoneServer) -> None:
    from common.mx import local_addresses

    resolver = mx(zone, local_ips=local_addresses("127.0.0.1:2525"))
    with pytest.raises(DnsError) as e:
        resolver.targets("loopip.test", PORT)
    assert e.value.dsn == "5.4.6"
    # listening on a wildcard: every interface address is ours, 127.0.0.1 among them
    from common.mx import interface_addresses

    assert "127.0.0.1" in interface_addresses()
    assert "127.0.0.1" in local_addresses("0.0.0.0:25")
    assert local_addresses("[::1]:25") == ["::1"]


# -- one core, two fronts: the workers (blocking) and the ingress's verification (asyncio)


def outcome(resolve: Callable[[], list[Target]]) -> tuple[str, ...]:
    """The targets by preference (the shuffle within one is the rules' own, tested above), or the
    refusal's status and text."""
    try:
        targets = resolve()
    except DnsError as e:
        return (e.dsn, e.text)
    return tuple(sorted(f"{t.preference} {t}" for t in targets))


@pytest.mark.parametrize(
    "destination",
    [
        *sorted({name.rstrip(".") for name in RECORDS} - {"big.test"}),
        *["nosuch.test", "servfail.test", "[mx1.a.test]:26", "[127.0.0.9]", "[gone.test]", "[host]:0"],
    ],
)
def test_the_asyncio_front_answers_as_the_blocking_one(zone: ZoneServer, destination: str) -> None:
    # the same rules, the same DNS server: the same targets or the same refusal. (The zone server
    # rotates its records, so which addresses a cut at max_addresses keeps may differ between two
    # lookups: the cut is tested above, not here.)
    rules: dict[str, Any] = {"local_names": ["me.example"], "local_ips": ["127.0.0.1"], "max_addresses": 10}
    blocking = MXResolver(make_resolver([zone.address], timeout=ANSWER_TIMEOUT), rng=random.Random(3), **rules)
    aio = AsyncMXResolver(make_async_resolver([zone.address], timeout=ANSWER_TIMEOUT), rng=random.Random(3), **rules)
    expected = outcome(lambda: blocking.targets(destination, PORT))
    assert outcome(lambda: asyncio.run(aio.targets(destination, PORT))) == expected
    if destination in ("null.test", "nosuch.test", "loop.test", "loopip.test"):
        assert expected[0] in ("5.1.10", "5.1.2", "5.4.6")
