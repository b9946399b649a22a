"""Recipient verification and delivery resolve a destination with one resolver (common/mx.py):
what a worker bounces for DNS reasons, a live ingress refuses at RCPT with the same status, and a
verification spreads over MX hosts of equal preference as deliveries do. A real `mtaq ingress`, a
real worker and a DNS server on loopback (issue 17.1)."""

from __future__ import annotations

from collections.abc import Callable

from ingress import replies
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA
from tests.integration.eventually import GENEROUS, wait_for_log
from tests.integration.smtpwire import Wire
from tests.sinks import SinkServer

# recipient -> what verification answers at RCPT, the worker's bounce status being its enhanced code
REFUSED = {
    "bob@null.test": replies.NULL_MX_RECIPIENT,  # RFC 7505 null MX
    "bob@nx.test": replies.UNKNOWN_DOMAIN_RECIPIENT,  # NXDOMAIN
    "bob@loop.test": replies.LOOPING_RECIPIENT,  # the MX is an address we listen on
    "bob@noaddr.test": replies.UNROUTABLE_RECIPIENT,  # no MX host has an address
}


def zone_for_refusals(dns: ZoneServer) -> None:
    dns.add("null.test.", "MX", "0 .")
    dns.add("loop.test.", "MX", "10 mx.loop.test.")
    dns.add("mx.loop.test.", "A", "127.0.0.1")  # both MTAs listen on 127.0.0.1
    dns.add("noaddr.test.", "MX", "10 bare.noaddr.test.")
    dns.add("bare.noaddr.test.", "TXT", '"no address"')


def test_verification_refuses_what_the_worker_bounces_with_its_status(
    mta_factory: Callable[..., MTA], dns: ZoneServer
) -> None:
    zone_for_refusals(dns)
    domains = ",".join(sorted(a.partition("@")[2] for a in REFUSED))
    # the ingress that verifies: the client (127.0.0.1) is outside mynetworks
    verifying = mta_factory(mynetworks="10.255.255.0/24", relay_domains=domains, verify_relay_recipients="yes")
    verifying.start_ingress()
    with Wire(verifying.port, timeout=GENEROUS) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<a@elsewhere.test>").status == (250, "2.1.0")
        said = {rcpt: str(w.cmd(f"RCPT TO:<{rcpt}>")) for rcpt in REFUSED}
    assert said == {rcpt: str(reply) for rcpt, reply in REFUSED.items()}
    # the same recipients, accepted from a trusted client and handed to a worker: bounced, each
    # with the status the ingress refused it with (MAIL FROM:<>: no DSN to send back)
    delivering = mta_factory()
    delivering.start_ingress()
    delivering.start_worker()
    qid = delivering.send("", list(REFUSED), b"Subject: t\r\n\r\nx\r\n")
    log = delivering.log_dir / "worker0.log"
    for rcpt, reply in REFUSED.items():
        wait_for_log(log, f"{qid}: to=<{rcpt}>, relay=none")
        line = next(ln for ln in log.read_text().splitlines() if f"{qid}: to=<{rcpt}>" in ln)
        assert f"dsn={reply.enhanced}, " in line and ", status=bounced (" in line, line
    assert "invalid by verification: 5.1.10 Domain null.test does not accept mail (nullMX)" in (
        (verifying.log_dir / "ingress.log").read_text()
    )


def test_verification_spreads_over_mx_hosts_of_equal_preference(
    mta_factory: Callable[..., MTA], sinks: Callable[..., SinkServer], dns: ZoneServer
) -> None:
    dns.add("same.test.", "MX", "10 a.same.test.")
    dns.add("same.test.", "MX", "10 b.same.test.")
    dns.add("a.same.test.", "A", "127.0.0.11")
    dns.add("b.same.test.", "A", "127.0.0.12")
    first, second = sinks("127.0.0.11"), sinks("127.0.0.12")
    mta = mta_factory(mynetworks="10.255.255.0/24", relay_domains="same.test", verify_relay_recipients="yes")
    mta.start_ingress()
    with Wire(mta.port, timeout=GENEROUS) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<a@elsewhere.test>").status == (250, "2.1.0")
        for i in range(24):  # 24 addresses, one probe each: all to one host has odds of 2 in 2^24
            assert w.cmd(f"RCPT TO:<user{i}@same.test>").status == (250, "2.1.5")
    assert first.attempts + second.attempts == 24
    assert first.attempts > 0 and second.attempts > 0, (first.attempts, second.attempts)
    assert first.messages == [] and second.messages == []  # probes: no mail sent
