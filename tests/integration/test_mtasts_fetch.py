"""The MTA-STS policy fetch over real DNS and HTTPS on loopback (worker/mtasts.py ``fetch_policy``):
the address comes from our resolver, the certificate is checked for ``mta-sts.<domain>``, redirects,
other media types, other CAs and oversized bodies are refused."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest
import trustme

from common.mx import make_resolver
from tests.dnsserver import ZoneServer
from tests.policyserver import PolicyServer, serving
from worker.mtasts import MAX_POLICY_SIZE, PolicyError, fetch_policy, parse_policy

WEB = "127.0.21.1"
POLICY = b"version: STSv1\nmode: enforce\nmx: mx.a.test\nmax_age: 86400\n"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def web(ca: trustme.CA) -> Iterator[PolicyServer]:
    with serving(WEB, ca, {"a.test": POLICY, "big.test": b"x" * (MAX_POLICY_SIZE + 10)}) as server:
        yield server


def client(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def test_policy_fetched_from_the_address_our_resolver_gives(dns: ZoneServer, web: PolicyServer, ca: trustme.CA) -> None:
    dns.add("mta-sts.a.test.", "A", WEB)
    resolver = make_resolver([dns.address], timeout=2)
    body = fetch_policy("a.test", resolver, client(ca), timeout=10)
    assert parse_policy(body).mx == ("mx.a.test",)
    assert dns.query_count("mta-sts.a.test.", "A") == 1 and web.hits == {"a.test": 1}


def test_refusals(dns: ZoneServer, web: PolicyServer, ca: trustme.CA) -> None:
    dns.add("mta-sts.a.test.", "A", WEB)
    dns.add("mta-sts.big.test.", "A", WEB)
    resolver = make_resolver([dns.address], timeout=2)

    def refused(domain: str, ctx: ssl.SSLContext) -> PolicyError:
        with pytest.raises(PolicyError) as e:
            fetch_policy(domain, resolver, ctx, timeout=10)
        return e.value

    assert refused("big.test", client(ca)).result_type == "sts-policy-invalid"
    assert refused("nowhere.test", client(ca)).result_type == "sts-policy-fetch-error"  # no address
    assert refused("a.test", client(trustme.CA())).result_type == "sts-webpki-invalid"  # other CA
    web.content_type = "text/html"
    assert "not text/plain" in refused("a.test", client(ca)).text
    web.content_type, web.status, web.location = "text/plain", 302, "https://elsewhere.test/"
    assert "HTTP 302" in refused("a.test", client(ca)).text  # redirects are not followed
    web.status = 404
    assert refused("a.test", client(ca)).result_type == "sts-policy-fetch-error"
