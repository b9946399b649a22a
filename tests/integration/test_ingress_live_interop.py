"""What real peers sent a live `mtaq ingress` (issue 11), reproduced without those peers: Postfix's
SMTPUTF8 ORCPT, trailing-dot domains, refusals in the log, relay recipients.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.dnsserver import ZoneServer
from tests.fixtures import MTA
from tests.integration.eventually import GENEROUS, wait_for_log
from tests.integration.smtpwire import Wire
from tests.ports import free_port
from tests.sinks import SinkServer

OK = (250, "2.1.5")


@pytest.fixture
def relay_mta(mta_factory: Callable[..., MTA]) -> MTA:
    # the client (127.0.0.1) is outside mynetworks: only ours.test is accepted from it
    mta = mta_factory(mynetworks="10.255.255.0/24", relay_domains="ours.test")
    mta.start_ingress()
    return mta


def test_smtputf8_orcpt_as_postfix_sends_it(relay_mta: MTA) -> None:
    with Wire(relay_mta.port) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<sender@client.test> SMTPUTF8").status == (250, "2.1.0")
        # Postfix: xtext-escaped UTF-8 under rfc822; RFC 6533: utf-8-addr-unitext
        assert w.cmd("RCPT TO:<jörg@ours.test> ORCPT=rfc822;j+C3+B6rg@foreign.example").status == OK
        assert w.cmd("RCPT TO:<anna@ours.test> ORCPT=utf-8;änna@foreign.example").status == OK
        # really malformed: the recipient is kept, the ORCPT dropped and logged
        assert w.cmd("RCPT TO:<bob@ours.test> ORCPT=rfc822;bad+ZZ").status == OK
        assert w.cmd("DATA").code == 354
        done = w.cmd(b"Subject: utf8\r\n\r\nx\r\n.")
        assert done.status == (250, "2.0.0")
    stored = relay_mta.store.load(done.text.rsplit(" ", 1)[-1])
    assert stored is not None
    assert [(r.address, r.orcpt) for r in stored.envelope.recipients] == [
        ("jörg@ours.test", "rfc822;jörg@foreign.example"),
        ("anna@ours.test", "rfc822;änna@foreign.example"),
        ("bob@ours.test", None),
    ]
    wait_for_log(relay_mta.log_dir / "ingress.log", "ORCPT of <bob@ours.test> dropped: bad xtext escape")


def test_trailing_dot_domain_is_normalised(relay_mta: MTA) -> None:
    # issue 11.9: <user@ours.test.> was accepted and forwarded as is, then refused by the next hop
    with Wire(relay_mta.port) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<sender@client.test.>").status == (250, "2.1.0")
        assert w.cmd("RCPT TO:<user@ours.test.>").status == OK
        assert w.cmd("RCPT TO:<user@elsewhere.test.>").status == (554, "5.7.1")
        assert w.cmd("DATA").code == 354
        done = w.cmd(b"Subject: dot\r\n\r\nx\r\n.")
        assert done.status == (250, "2.0.0")
    qid = done.text.rsplit(" ", 1)[-1]
    stored = relay_mta.store.load(qid)
    assert stored is not None
    assert stored.envelope.sender == "sender@client.test"
    assert [r.address for r in stored.envelope.recipients] == ["user@ours.test"]
    assert b"for <user@ours.test>;" in stored.body.split(b"\r\n\r\n", 1)[0]


def test_refusals_are_logged_once_postfix_style(relay_mta: MTA) -> None:
    # issue 11.4: relay denials, smuggling, NUL bytes, syntax errors left no trace in the log
    with Wire(relay_mta.port) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<a@client.test>").status == (250, "2.1.0")
        assert w.cmd("RCPT TO:<victim@elsewhere.test>").status == (554, "5.7.1")
        assert w.cmd(b"NO\x00OP").status == (500, "5.5.2")
        assert w.cmd("RCPT TO:<a b@ours.test>").status == (501, "5.1.3")
        assert w.cmd("RCPT TO:<bob@ours.test>").status == OK
        assert w.cmd("DATA").code == 354
        w.send(b"Subject: outer\r\n\r\nhello\n.\nMAIL FROM:<evil@x.test>\r\n.\r\n")
        assert w.reply().status == (550, "5.6.0")
        assert w.cmd("QUIT").code == 221
    path = relay_mta.log_dir / "ingress.log"
    expected = [
        "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 <victim@elsewhere.test>: Relay access denied; "
        "from=<a@client.test> to=<victim@elsewhere.test> proto=ESMTP helo=<client.test>",
        "NOQUEUE: reject: UNKNOWN from unknown[127.0.0.1]: 500 5.5.2 ",
        "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 501 5.1.3 ",
        "NOQUEUE: reject: END-OF-MESSAGE from unknown[127.0.0.1]: 550 5.6.0 Error: message contains bare CR or "
        "LF; from=<a@client.test> proto=ESMTP helo=<client.test>",
    ]
    log = wait_for_log(path, expected[-1])
    for line in expected:
        assert log.count(line) == 1, (line, log)
    assert log.count("NOQUEUE: reject:") == len(expected)  # nothing for the smuggled MAIL


def test_relay_recipients_and_verification_against_the_next_hop(
    mta_factory: Callable[..., MTA], sinks: Callable[..., SinkServer], mx_port: int, tmp_path: Path
) -> None:
    # issue 11.3: an inbound relay that accepts unknown recipients later bounces to forged senders
    # (backscatter). The table refuses the unlisted; verification asks the next hop (an aiosmtpd
    # sink that refuses one recipient) at RCPT time, and remembers the answer.
    hop = sinks("127.0.0.5")
    hop.rcpt_replies = {"gone@ours.test": "550 5.1.1 <gone@ours.test>: no such user"}
    table = tmp_path / "relay_recipients"
    table.write_text("# who exists behind us\nbob@ours.test\ngone@ours.test\n")
    mta = mta_factory(
        mynetworks="10.255.255.0/24",
        relay_domains="ours.test",
        relayhost=f"[127.0.0.5]:{mx_port}",
        relay_recipients=table,
        verify_relay_recipients="yes",
    )
    mta.start_ingress()
    with Wire(mta.port) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<forged@elsewhere.test>").status == (250, "2.1.0")
        carol = w.cmd("RCPT TO:<carol@ours.test>")  # not in the table: the next hop is not asked
        assert str(carol) == "550 5.1.1 Recipient address rejected: User unknown in relay recipient table"
        gone = w.cmd("RCPT TO:<gone@ours.test>")  # listed, but the next hop refuses it
        assert str(gone) == "550 5.1.1 Recipient address rejected: undeliverable address"
        assert w.cmd("RCPT TO:<bob@ours.test>").status == OK
        assert w.cmd("DATA").code == 354
        done = w.cmd(b"Subject: inbound\r\n\r\nx\r\n.")
        assert done.status == (250, "2.0.0")
    stored = mta.store.load(done.text.rsplit(" ", 1)[-1])
    assert stored is not None
    assert [r.address for r in stored.envelope.recipients] == ["bob@ours.test"]
    assert stored.envelope.trusted is False  # outside mynetworks, not authenticated: DSNs headers-only
    assert [r for r, _ in hop.rejected] == ["gone@ours.test"]
    assert hop.attempts == 2 and hop.messages == []  # two probes (MAIL FROM:<>), no mail sent
    # the answers are cached: asking again does not reach the next hop
    with Wire(mta.port) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<forged@elsewhere.test>").status == (250, "2.1.0")
        assert w.cmd("RCPT TO:<gone@ours.test>").status == (550, "5.1.1")
        assert w.cmd("RCPT TO:<bob@ours.test>").status == OK
    assert hop.attempts == 2
    wait_for_log(mta.log_dir / "ingress.log", "recipient <gone@ours.test> invalid by verification: 127.0.0.5")


def test_verification_without_an_answer_is_450_never_250(mta_factory: Callable[..., MTA]) -> None:
    dead = free_port(["127.0.0.6"])  # nothing listens there
    mta = mta_factory(
        mynetworks="10.255.255.0/24",
        relay_domains="ours.test",
        relayhost=f"[127.0.0.6]:{dead}",
        verify_relay_recipients="yes",
    )
    mta.start_ingress()
    with Wire(mta.port, timeout=GENEROUS) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<a@elsewhere.test>").status == (250, "2.1.0")
        assert str(w.cmd("RCPT TO:<bob@ours.test>")) == (
            "450 4.1.1 Recipient address rejected: unverified address, try again later"
        )
        assert w.cmd("NOOP").status == (250, "2.0.0")


def test_verification_asks_the_mx_found_in_dns(
    mta_factory: Callable[..., MTA], sinks: Callable[..., SinkServer], dns: ZoneServer
) -> None:
    # no relayhost: the ingress looks up the domain's MX (the test zone's DNS server, as the
    # workers do) and asks that host
    dns.add("ours.test.", "MX", "10 mx.ours.test.")
    dns.add("mx.ours.test.", "A", "127.0.0.7")
    hop = sinks("127.0.0.7")
    hop.rcpt_replies = {"gone@ours.test": "550 5.1.1 no such user"}
    mta = mta_factory(mynetworks="10.255.255.0/24", relay_domains="ours.test", verify_relay_recipients="yes")
    mta.start_ingress()
    with Wire(mta.port, timeout=GENEROUS) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<a@elsewhere.test>").status == (250, "2.1.0")
        assert w.cmd("RCPT TO:<gone@ours.test>").status == (550, "5.1.1")
        assert w.cmd("RCPT TO:<bob@ours.test>").status == OK
    assert [r for r, _ in hop.rejected] == ["gone@ours.test"] and hop.attempts == 2
