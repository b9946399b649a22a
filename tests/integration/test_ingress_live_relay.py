"""The open-relay suite over a real socket: a client outside ``mynetworks`` (10.255.255.0/24), not
authenticated, with ``relay_domains = ours.test``. Every trick that would get mail relayed to a
foreign host is refused at RCPT; the unit corpus (tests/unit/test_policy.py) checks the same rules
without a socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import MTA
from tests.integration.smtpwire import Wire
from tests.redisserver import RedisServer

RELAY_DENIED = (554, "5.7.1")
BAD_ADDRESS = (501, "5.1.3")
OK = (250, "2.1.5")

# RCPT arguments refused as relaying
RELAY_TRICKS = [
    "<user@elsewhere.test>",
    "user@elsewhere.test",  # without angle brackets
    "<user@elsewhere.test.>",  # trailing dot
    "<USER@ELSEWHERE.TEST>",  # case
    "<user@ElseWhere.Test.>",
    "<user%elsewhere.test@ours.test>",  # percent hack
    "<user%elsewhere.test@OURS.TEST>",
    "<user%elsewhere.test@ours.test.>",
    "<user%elsewhere.test%ours.test@ours.test>",
    "<@ours.test:user@elsewhere.test>",  # source routes (RFC 5321 §4.1.2: the route is ignored)
    "<@ours.test,@relay.ours.test:user@elsewhere.test>",
    "<@OURS.TEST:user@elsewhere.test>",
    '<"user@elsewhere.test"@ours.test>',  # quoted local parts with @
    '<"user@elsewhere.test"@OURS.TEST.>',
    '<"user\\@elsewhere.test"@ours.test>',
    '<"user%elsewhere.test"@ours.test>',
    '<"@elsewhere.test:user"@ours.test>',
    "<elsewhere.test!user@ours.test>",  # bang paths
    '<"elsewhere.test!user"@ours.test>',
    "<a!b!user@ours.test>",
    "<user@[203.0.113.50]>",  # IP literals, even of ourselves
    "<user@[127.0.0.1]>",
    "<user@[IPv6:::1]>",
    "<user@[IPv6:2001:db8::1]>",
    "<user@ours.test.elsewhere.test>",  # our name inside a foreign one
    "<user@sub.ours.test>",  # subdomains are not implied
]
# malformed: refused as bad syntax before the relay check is even reached
MALFORMED = [
    "<user@elsewhere.test@ours.test>",
    "<user@ours.test..>",
    "<user@ours.test%elsewhere.test>",
    "<user@ours.test:elsewhere.test>",
    "<ours.test:user@elsewhere.test>",
    "<@elsewhere.test>",
    "<user@[ours.test]>",
    "<user@ours.test,@elsewhere.test>",
]
ACCEPTED = [
    "<user@ours.test>",
    "<USER@OURS.TEST>",
    "<user@ours.test.>",
    "<User@Ours.Test.>",
    "<postmaster>",
    "<Postmaster>",
    "<user+tag@ours.test>",
    '<"plain quoted"@ours.test>',
]


@pytest.fixture(scope="module")
def relay_mta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MTA]:
    d: Path = tmp_path_factory.mktemp("relay")
    with RedisServer(d / "redis") as rs:
        mta = MTA(rs.url, 1, 1, d, mynetworks="10.255.255.0/24", relay_domains="ours.test", max_errors=100)
        mta.start_ingress()
        try:
            yield mta
        finally:
            mta.stop_all()


def rcpt(mta: MTA, arg: str, mail_params: str = "") -> tuple[int, str]:
    with Wire(mta.port) as w:
        w.greet()
        assert w.cmd(f"MAIL FROM:<stranger@elsewhere.test>{mail_params}").status == (250, "2.1.0")
        status = w.cmd(f"RCPT TO:{arg}").status
        assert w.cmd("NOOP").status == (250, "2.0.0")
        return status


@pytest.mark.parametrize("arg", RELAY_TRICKS)
def test_relay_tricks_refused(relay_mta: MTA, arg: str) -> None:
    assert rcpt(relay_mta, arg) == RELAY_DENIED


@pytest.mark.parametrize("arg", MALFORMED)
def test_malformed_relay_tricks_refused(relay_mta: MTA, arg: str) -> None:
    assert rcpt(relay_mta, arg) == BAD_ADDRESS


@pytest.mark.parametrize("arg", ACCEPTED)
def test_own_domain_accepted(relay_mta: MTA, arg: str) -> None:
    assert rcpt(relay_mta, arg) == OK


def test_parameters_and_smtputf8_change_nothing(relay_mta: MTA) -> None:
    assert rcpt(relay_mta, "<user@ours.test> NOTIFY=NEVER") == OK
    assert rcpt(relay_mta, "<user@elsewhere.test> NOTIFY=NEVER ORCPT=rfc822;user@ours.test") == RELAY_DENIED
    # a look-alike of ours.test with a Cyrillic o (U+043E): not ours
    lookalike = "<user@\u043eurs.test>"
    assert rcpt(relay_mta, lookalike, " SMTPUTF8") == RELAY_DENIED
    assert rcpt(relay_mta, lookalike) == (553, "5.6.7")
    assert rcpt(relay_mta, "<usér@ours.test>", " SMTPUTF8") == OK


def test_whole_transaction_with_mixed_recipients(relay_mta: MTA) -> None:
    """Refused recipients are not in the stored envelope; the accepted ones are."""
    with Wire(relay_mta.port) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<stranger@elsewhere.test>").status == (250, "2.1.0")
        for arg in RELAY_TRICKS[:6]:
            assert w.cmd(f"RCPT TO:{arg}").status == RELAY_DENIED
        assert w.cmd("RCPT TO:<bob@ours.test>").status == OK
        assert w.cmd("DATA").code == 354
        done = w.cmd(b"Subject: inbound\r\n\r\nhi\r\n.")
        assert done.status == (250, "2.0.0")
    qid = done.text.rsplit(" ", 1)[-1]
    stored = relay_mta.store.load(qid)
    assert stored is not None
    assert [r.address for r in stored.envelope.recipients] == ["bob@ours.test"]
    assert stored.envelope.client_addr == "127.0.0.1" and stored.envelope.protocol == "ESMTP"
