"""What real peers sent a live `mtaq ingress` (issue 11), reproduced without those peers: Postfix's
SMTPUTF8 ORCPT, trailing-dot domains, refusals in the log, relay recipients.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.conftest import MTA
from tests.integration.eventually import wait_for_log
from tests.integration.smtpwire import Wire

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
