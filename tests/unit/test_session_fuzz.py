"""Property tests: whatever a client sends, in whatever chunks, the session never raises, every
reply is well formed, memory stays bounded, and no message is emitted that was not properly sent."""

from __future__ import annotations

import ipaddress
import itertools
import re

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ingress import replies
from ingress.limits import MAX_BUFFER_WHILE_WAITING, MAX_BUFFERED_LINE
from ingress.session import (
    Authenticate,
    Close,
    Event,
    Peer,
    Send,
    Session,
    SessionConfig,
    StartTLS,
    Transaction,
)

HOST = b"mx.example.net"
# Every 2xx/4xx/5xx reply line carries an RFC 3463 enhanced code of the same class (RFC 2034) ...
ENHANCED = re.compile(rb"([245])\d\d[ -]\1\.\d{1,3}\.\d{1,3} [^\r\n]*\r\n")
# ... except the greeting and the EHLO/HELO replies (RFC 2034 §3), and 3xx, which has no class.
EXEMPT = re.compile(
    rb"220 mx\.example\.net ESMTP mtaq\r\n"
    rb"|250[ -](mx\.example\.net|PIPELINING|SIZE \d+|STARTTLS|AUTH PLAIN LOGIN|ENHANCEDSTATUSCODES"
    rb"|8BITMIME|DSN|SMTPUTF8|REQUIRETLS)\r\n"
    rb"|354 End data with <CR><LF>\.<CR><LF>\r\n"
    rb"|334 [A-Za-z0-9+/=]*\r\n"
)

COMMANDS = [
    b"EHLO c.example",
    b"HELO c.example",
    b"MAIL FROM:<a@example.com>",
    b"MAIL FROM:<>",
    b"mail from: <a@example.com> SIZE=10 BODY=8BITMIME RET=HDRS ENVID=x+2B",
    b"MAIL FROM:<j\xc3\xb6rg@example.com> SMTPUTF8",
    b"RCPT TO:<b@example.org>",
    b"RCPT TO:<b@example.org> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+40example.org",
    b"RCPT TO:<b@foreign.example>",
    b"RCPT TO:<b%foreign.example@example.org>",
    b"RCPT TO:<postmaster>",
    b"DATA",
    b".",
    b"..x",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"VRFY x",
    b"HELP",
    b"STARTTLS",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"AUTH PLAIN AGFsaWNlAHB3",
    b"*",
    b"YWxpY2U=",
    b"",
    b"Subject: x",
    b"\x00",
    b"\xff\xfe",
    b"x" * 600,
]
# A whole opening of a transaction, so that the fuzzer reaches DATA often.
OPENING = b"EHLO c.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA"
WHOLE = OPENING + b"\r\nSubject: x\r\n\r\n..body\r\n."
line = st.one_of(st.sampled_from([OPENING, WHOLE]), st.sampled_from(COMMANDS), st.binary(max_size=40))
terminator = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])
scripts = st.lists(st.tuples(line, terminator), max_size=40).map(lambda parts: b"".join(a + b for a, b in parts))


@st.composite
def sessions(draw: st.DrawFn) -> Session:
    config = SessionConfig(
        hostname=HOST.decode(),
        max_message_size=draw(st.integers(1, 300)),
        max_recipients=draw(st.integers(1, 3)),
        max_errors=draw(st.integers(1, 30)),
        networks=(ipaddress.ip_network("192.0.2.0/24"),),
        relay_domains=frozenset({"example.org"}),
        tls_available=draw(st.booleans()),
        tls_required=draw(st.sampled_from([False, False, False, True])),
        auth_available=draw(st.booleans()),
    )
    peer = draw(st.sampled_from([Peer("192.0.2.1", 1), Peer("203.0.113.1", 2)]))
    return Session(config, peer, tls=draw(st.booleans()))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


class Checker:
    """Drives a session like a server would and checks every event."""

    def __init__(self, session: Session, answers: st.DataObject) -> None:
        self.s = session
        self.answers = answers
        self.fed = b""
        self.mail_ok = self.rcpt_ok = self.data_ok = False
        self.transactions = 0

    def handle(self, events: list[Event]) -> None:
        pending = list(events)
        while pending:
            event = pending.pop(0)
            if isinstance(event, Send):
                self.check_send(event.data)
            elif isinstance(event, Transaction):
                self.check_transaction(event)
                if self.answers.draw(st.booleans()):
                    pending += self.s.message_stored("QID")
                else:
                    pending += self.s.message_failed(replies.STORAGE_FAILED)
            elif isinstance(event, StartTLS):
                assert self.s.waiting and self.s.buffered == 0
                pending += self.s.tls_started()
            elif isinstance(event, Authenticate):
                assert "pw" not in repr(event)
                pending += self.s.auth_result(self.answers.draw(st.booleans()))
            else:
                assert isinstance(event, Close)
                assert self.s.closed

    def check_send(self, data: bytes) -> None:
        assert data.endswith(b"\r\n")
        for reply_line in data.splitlines(keepends=True):
            assert ENHANCED.fullmatch(reply_line) or EXEMPT.fullmatch(reply_line), reply_line
            if reply_line.startswith(b"250 2.1.0"):
                self.mail_ok = True
            elif reply_line.startswith(b"250 2.1.5"):
                self.rcpt_ok = True
            elif reply_line.startswith(b"354 "):
                self.data_ok = True

    def check_transaction(self, tx: Transaction) -> None:
        assert self.mail_ok and self.rcpt_ok and self.data_ok
        self.mail_ok = self.rcpt_ok = self.data_ok = False
        self.transactions += 1
        event("transaction")
        # Never more messages than ".CRLF" lines in the input. The line before it ends in CRLF, or is
        # the DATA command itself, which (commands only) may end in a bare LF.
        assert self.transactions <= len(re.findall(rb"(?=(?:\r\n|DATA[ \t]*\n)\.\r\n)", self.fed, re.I))
        assert tx.recipients
        assert len(tx.data) <= self.s.config.max_message_size
        assert b"\x00" not in tx.data
        assert tx.data == b"" or tx.data.endswith(b"\r\n")
        assert re.search(rb"\r(?!\n)|(?<!\r)\n", tx.data) is None  # no bare CR or LF

    def feed(self, chunk: bytes) -> None:
        self.fed += chunk
        self.handle(self.s.receive_data(chunk))
        bound = MAX_BUFFER_WHILE_WAITING + MAX_BUFFERED_LINE + self.s.config.max_message_size + len(chunk)
        assert self.s.buffered <= bound


FAST = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(
    session=sessions(), data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8), answers=st.data()
)
def test_arbitrary_bytes(session: Session, data: bytes, cuts: list[int], answers: st.DataObject) -> None:
    checker = Checker(session, answers)
    checker.handle(session.start())
    for chunk in chunked(data, cuts):
        checker.feed(chunk)
    checker.handle(session.eof())
    assert session.closed


@FAST
@given(session=sessions(), script=scripts, cuts=st.lists(st.integers(0, 4000), max_size=12), answers=st.data())
def test_command_sequences(session: Session, script: bytes, cuts: list[int], answers: st.DataObject) -> None:
    checker = Checker(session, answers)
    checker.handle(session.start())
    for chunk in chunked(script, cuts):
        checker.feed(chunk)
    last = answers.draw(st.sampled_from(["eof", "timeout", "shutdown"]))
    checker.handle(session.eof() if last == "eof" else session.timeout() if last == "timeout" else session.shutdown())
    assert session.closed


@FAST
@given(body=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_data_without_crlf_dot_crlf_never_ends(body: bytes, cuts: list[int]) -> None:
    while b"\r\n.\r\n" in body:
        body = body.replace(b"\r\n.\r\n", b"\r\n,\r\n")
    if body.startswith(b".\r\n"):
        body = b"," + body[1:]
    s = Session(SessionConfig(hostname="h", max_message_size=100, max_recipients=1), Peer("192.0.2.1", 1))
    s.start()
    s.receive_data(b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n")
    for chunk in chunked(body, cuts):
        assert s.receive_data(chunk) == []
    assert s.in_transaction and not s.waiting
