"""The sans-IO SMTP session, driven directly: bytes in, events out (RFC 5321 and extensions)."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

import pytest

from common.envelope import Recipient
from common.settings import Settings
from ingress import replies
from ingress.limits import MAX_BUFFER_WHILE_WAITING, MAX_BUFFERED_LINE, MAX_COMMAND_LINE, MAX_TEXT_LINE
from ingress.params import xtext_decode
from ingress.replies import Reply
from ingress.session import (
    KNOWN_VERBS,
    PIPELINE_OVERFLOW,
    TRANSITIONS,
    Authenticate,
    AwaitFlow,
    Close,
    Event,
    Peer,
    Send,
    Session,
    SessionConfig,
    StartTLS,
    State,
    Transaction,
)

HOST = "mx.example.net"
TRUSTED = Peer("192.0.2.7", 40000, "client.example")
UNTRUSTED = Peer("203.0.113.9", 40001)


def config(**kw: Any) -> SessionConfig:
    base: dict[str, Any] = dict(
        hostname=HOST,
        max_message_size=2000,
        max_recipients=3,
        max_errors=20,
        networks=(ipaddress.ip_network("192.0.2.0/24"),),
        relay_domains=frozenset({"example.org"}),
        tls_available=True,
        auth_available=True,
    )
    base.update(kw)
    return SessionConfig(**base)


def new(peer: Peer = TRUSTED, *, tls: bool = False, **kw: Any) -> Session:
    s = Session(config(**kw), peer, tls=tls)
    assert s.start() == [Send(b"220 mx.example.net ESMTP mtaq\r\n")]
    return s


def wire(*items: Reply) -> bytes:
    return b"".join(r.to_bytes() for r in items)


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def feed(s: Session, data: bytes) -> bytes:
    """Feed data, assert it only produced Sends, and return what was sent."""
    events = s.receive_data(data)
    assert all(isinstance(e, Send) for e in events), events
    return sent(events)


def ehlo(s: Session) -> Session:
    feed(s, b"EHLO client.example\r\n")
    return s


def transaction(events: list[Event]) -> Transaction:
    txs = [e for e in events if isinstance(e, Transaction)]
    assert len(txs) == 1, events
    return txs[0]


def in_data(s: Session, *rcpts: str) -> Session:
    ehlo(s)
    feed(s, b"MAIL FROM:<sender@example.com>\r\n")
    for r in rcpts or ("rcpt@example.org",):
        assert feed(s, f"RCPT TO:<{r}>\r\n".encode()) == wire(replies.RECIPIENT_OK)
    assert feed(s, b"DATA\r\n") == wire(replies.DATA_START)
    return s


# -- greeting, EHLO, HELO --------------------------------------------------------------------------
def test_ehlo_plain_connection_offers_starttls_not_auth() -> None:
    s = new()
    assert feed(s, b"EHLO client.example\r\n") == (
        b"250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 2000\r\n250-STARTTLS\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8\r\n"
    )
    assert s.helo == "client.example"
    assert s.protocol == "ESMTP"


def test_ehlo_under_tls_offers_auth_not_starttls() -> None:
    s = new(tls=True)
    out = feed(s, b"ehlo client.example\r\n")
    assert b"250-AUTH PLAIN LOGIN\r\n" in out
    assert b"STARTTLS" not in out
    assert s.protocol == "ESMTPS"


def test_ehlo_without_tls_or_auth_configured() -> None:
    out = feed(new(tls_available=False, auth_available=False), b"EHLO x\r\n")
    assert b"STARTTLS" not in out and b"AUTH" not in out


def test_helo_is_plain_smtp() -> None:
    s = new()
    assert feed(s, b"HELO client.example\r\n") == b"250 mx.example.net\r\n"
    assert s.protocol == "SMTP"
    events = s.receive_data(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nhi\r\n.\r\n")
    assert transaction(events).protocol == "SMTP"


@pytest.mark.parametrize("line", [b"EHLO\r\n", b"HELO\r\n", b"EHLO \r\n"])
def test_helo_without_argument(line: bytes) -> None:
    s = new()
    assert feed(s, line) == wire(replies.SYNTAX_ERROR_ARGS)
    assert s.state is State.CONNECTED


def test_second_ehlo_resets_the_transaction() -> None:
    s = ehlo(new())
    feed(s, b"MAIL FROM:<a@example.com>\r\n")
    assert s.in_transaction
    ehlo(s)
    assert not s.in_transaction
    assert feed(s, b"RCPT TO:<b@example.org>\r\n") == wire(replies.BAD_SEQUENCE)


# -- a whole transaction ---------------------------------------------------------------------------
def test_complete_transaction_and_queued_reply() -> None:
    s = in_data(new(), "rcpt@example.org", "other@example.org")
    events = s.receive_data(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    tx = transaction(events)
    assert events == [tx]
    assert tx == Transaction(
        sender="sender@example.com",
        recipients=(Recipient("rcpt@example.org"), Recipient("other@example.org")),
        data=b"Subject: hi\r\n\r\nbody\r\n",
        helo="client.example",
        protocol="ESMTP",
        body_8bit=False,
        smtputf8=False,
        ret=None,
        envid=None,
        auth_user=None,
        trusted=True,  # TRUSTED is in the networks
    )
    assert s.waiting and s.in_transaction
    assert s.message_stored("QID1") == [Send(b"250 2.0.0 Ok: queued as QID1\r\n")]
    assert not s.waiting and not s.in_transaction
    # HELO kept, transaction cleared
    assert feed(s, b"RCPT TO:<x@example.org>\r\n") == wire(replies.BAD_SEQUENCE)
    assert feed(s, b"MAIL FROM:<>\r\n") == wire(replies.SENDER_OK)


def test_message_failed_answers_and_resets() -> None:
    s = in_data(new())
    transaction(s.receive_data(b"x\r\n.\r\n"))
    assert s.message_failed(replies.STORAGE_FAILED) == [Send(wire(replies.STORAGE_FAILED))]
    assert s.state is State.READY
    assert s.errors == 0  # our failure, not the client's


def test_empty_message() -> None:
    s = in_data(new())
    assert transaction(s.receive_data(b".\r\n")).data == b""


def test_pipelining_replies_in_order_in_one_write() -> None:
    s = ehlo(new())
    events = s.receive_data(
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@foreign.example>\r\n"
        b"RCPT TO:<d@example.org>\r\nDATA\r\n"
    )
    ok = [replies.SENDER_OK, replies.RECIPIENT_OK, replies.RECIPIENT_OK, replies.RECIPIENT_OK, replies.DATA_START]
    assert events == [Send(wire(*ok))]


def test_input_is_buffered_while_waiting_and_processed_after() -> None:
    s = in_data(new())
    events = s.receive_data(b"body\r\n.\r\nMAIL FROM:<a@example.com>\r\n")
    transaction(events)
    assert s.receive_data(b"RCPT TO:<b@example.org>\r\nQUIT\r\n") == []
    assert s.message_stored("Q2") == [
        Send(wire(replies.queued("Q2"), replies.SENDER_OK, replies.RECIPIENT_OK, replies.BYE)),
        Close(reply_sent=True),
    ]
    assert s.closed
    assert s.receive_data(b"NOOP\r\n") == []


def test_byte_by_byte_is_the_same_as_one_chunk() -> None:
    script = (
        b"EHLO c.example\r\nMAIL FROM:<a@example.com> SIZE=10\r\nRCPT TO:<b@example.org> NOTIFY=NEVER\r\n"
        b"DATA\r\nline one\r\n..dot\r\n.\r\n"
    )
    whole = new()
    a = whole.receive_data(script)
    bytewise = new()
    b: list[Event] = []
    for i in range(len(script)):
        b += bytewise.receive_data(script[i : i + 1])
    assert sent(a) == sent(b)
    assert transaction(a) == transaction(b)
    assert transaction(a).data == b"line one\r\n.dot\r\n"


# -- sequence (the table) --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "script",
    [
        b"MAIL FROM:<a@example.com>\r\n",  # before EHLO
        b"EHLO x\r\nRCPT TO:<b@example.org>\r\n",  # RCPT before MAIL
        b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nMAIL FROM:<a@example.com>\r\n",  # nested MAIL
        b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nDATA\r\n",  # no recipient
        b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@foreign.example>\r\nDATA\r\n",  # none accepted
        b"EHLO x\r\nDATA\r\n",
        b"AUTH PLAIN\r\n",  # before EHLO
        b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nSTARTTLS\r\n",  # in a transaction
    ],
)
def test_bad_sequence(script: bytes) -> None:
    s = new(UNTRUSTED)
    assert feed(s, script).endswith(wire(replies.BAD_SEQUENCE))


def test_table_shape() -> None:
    for state, row in TRANSITIONS.items():
        assert row["QUIT"] is State.CLOSED, state
        assert row["EHLO"] is State.READY, state
    assert [st for st, row in TRANSITIONS.items() if "MAIL" in row] == [State.READY]
    assert [st for st, row in TRANSITIONS.items() if "DATA" in row] == [State.RCPT]
    assert "BDAT" not in KNOWN_VERBS


# -- simple commands -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"NOOP\r\n", replies.OK),
        (b"noop anything\r\n", replies.OK),
        (b"RSET\r\n", replies.RESET_OK),
        (b"RSET x\r\n", replies.SYNTAX_ERROR_ARGS),
        (b"VRFY root\r\n", replies.VRFY_CANNOT),
        (b"VRFY\r\n", replies.SYNTAX_ERROR_ARGS),
        (b"EXPN staff\r\n", replies.EXPN_DISABLED),
        (b"HELP\r\n", replies.HELP),
        (b"BDAT 10 LAST\r\n", replies.UNRECOGNIZED),
        (b"FOO\r\n", replies.UNRECOGNIZED),
        (b"\r\n", replies.UNRECOGNIZED),
        (b"NOOP\x00\r\n", replies.INVALID_CHARACTER),
        (b"NOOP a\rb\r\n", replies.INVALID_CHARACTER),
        (b"NOOP \xff\r\n", replies.INVALID_CHARACTER),
        ("NOOP ö\r\n".encode(), replies.INVALID_CHARACTER),
    ],
)
def test_simple_commands(line: bytes, reply: Reply) -> None:
    assert feed(ehlo(new()), line) == wire(reply)


def test_quit() -> None:
    s = new()
    assert s.receive_data(b"QUIT\r\nNOOP\r\n") == [Send(wire(replies.BYE)), Close(reply_sent=True)]
    assert s.closed
    assert s.receive_data(b"NOOP\r\n") == []
    assert s.timeout() == [] and s.shutdown() == [] and s.eof() == []


def test_rset_clears_transaction() -> None:
    s = ehlo(new())
    feed(s, b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRSET\r\n")
    assert s.state is State.READY
    assert feed(s, b"DATA\r\n") == wire(replies.BAD_SEQUENCE)


def test_bare_lf_ends_commands() -> None:
    s = new()
    assert feed(s, b"HELO x\nNOOP\n") == b"250 mx.example.net\r\n" + wire(replies.OK)


# -- line limits -----------------------------------------------------------------------------------
def test_command_line_limit_is_512_with_crlf() -> None:
    s = new()
    exact = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 2 - 5) + b"\r\n"
    assert len(exact) == 512
    assert feed(s, exact) == wire(replies.OK)
    assert feed(s, b"NOOP " + b"x" * (MAX_COMMAND_LINE - 6) + b"\r\n") == wire(replies.LINE_TOO_LONG)


def test_endless_command_line_stays_bounded() -> None:
    s = new()
    chunk = b"A" * 65536
    for _ in range(160):  # 10 MiB without a newline
        assert s.receive_data(chunk) == []
        assert s.buffered <= MAX_BUFFERED_LINE + len(chunk)
    assert feed(s, b"\r\nNOOP\r\n") == wire(replies.LINE_TOO_LONG, replies.OK)


def test_mail_line_may_carry_extension_parameters_beyond_512() -> None:
    s = ehlo(new())
    envid = "x" * 100
    line = f"MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME RET=HDRS ENVID={envid} AUTH=<> SMTPUTF8"
    line += " " * (600 - len(line))
    assert feed(s, line.encode() + b"\r\n") == wire(replies.SENDER_OK)


# -- MAIL parameters -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "reply"),
    [
        ("SIZE=2000", replies.SENDER_OK),
        ("SIZE=2001", replies.MESSAGE_TOO_BIG),
        ("SIZE=abc", replies.BAD_PARAM_VALUE),
        ("SIZE", replies.BAD_PARAM_VALUE),
        ("SIZE=", replies.BAD_PARAM_VALUE),
        ("SIZE=1 SIZE=1", replies.BAD_PARAM_VALUE),
        ("body=8bitmime", replies.SENDER_OK),
        ("BODY=7BIT", replies.SENDER_OK),
        ("BODY=BINARYMIME", replies.BAD_PARAM_VALUE),
        ("SMTPUTF8", replies.SENDER_OK),
        ("SMTPUTF8=yes", replies.BAD_PARAM_VALUE),
        ("RET=FULL", replies.SENDER_OK),
        ("RET=ALL", replies.BAD_PARAM_VALUE),
        ("ENVID=" + "x" * 100, replies.SENDER_OK),
        ("ENVID=" + "x" * 101, replies.BAD_PARAM_VALUE),
        ("ENVID=a+ZZ", replies.BAD_PARAM_VALUE),
        ("ENVID=a+0D+0Ab", replies.BAD_PARAM_VALUE),  # no CR/LF smuggled into DSN headers
        ("AUTH=<>", replies.SENDER_OK),
        ("FOO=1", replies.PARAM_NOT_RECOGNIZED),
        ("NOTIFY=NEVER", replies.PARAM_NOT_RECOGNIZED),
    ],
)
def test_mail_params(params: str, reply: Reply) -> None:
    s = ehlo(new())
    assert feed(s, f"MAIL FROM:<a@example.com> {params}\r\n".encode()) == wire(reply)


def test_mail_params_reach_the_transaction() -> None:
    s = ehlo(new())
    feed(s, b"mail from: <a@example.com> BODY=8BITMIME RET=hdrs ENVID=QQ+2B1\r\n")
    feed(s, b"RCPT TO:<b@example.org>\r\nDATA\r\n")
    tx = transaction(s.receive_data(b"\xe9t\xe9\r\n.\r\n"))
    assert (tx.body_8bit, tx.ret, tx.envid, tx.smtputf8) == (True, "HDRS", "QQ+1", False)
    assert tx.data == b"\xe9t\xe9\r\n"


def test_eight_bit_data_without_8bitmime_is_accepted() -> None:
    s = in_data(new())
    assert transaction(s.receive_data(b"caf\xc3\xa9\r\n.\r\n")).body_8bit is False


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<>\r\n", replies.SENDER_OK),
        (b"MAIL FROM: <a@example.com>\r\n", replies.SENDER_OK),
        (b"MAIL FROM:a@example.com\r\n", replies.SENDER_OK),
        (b"MAIL FROM:<@relay.example:a@example.com>\r\n", replies.SENDER_OK),
        (b"MAIL TO:<a@example.com>\r\n", replies.SYNTAX_ERROR_ARGS),
        (b"MAIL FROM:\r\n", replies.SYNTAX_ERROR_ARGS),
        (b"MAIL\r\n", replies.SYNTAX_ERROR_ARGS),
        (b"MAIL FROM:<a@example.com>junk\r\n", replies.SYNTAX_ERROR_ARGS),
        (b"MAIL FROM:<a@example.com\r\n", replies.BAD_ADDRESS),
        (b"MAIL FROM:<postmaster>\r\n", replies.BAD_ADDRESS),
        (b"MAIL FROM:<a@@example.com>\r\n", replies.BAD_ADDRESS),
        ("MAIL FROM:<jörg@example.com>\r\n".encode(), replies.NON_ASCII_ADDRESS),
        ("MAIL FROM:<jörg@example.com> SMTPUTF8\r\n".encode(), replies.SENDER_OK),
    ],
)
def test_mail_paths(line: bytes, reply: Reply) -> None:
    assert feed(ehlo(new()), line) == wire(reply)


def test_smtputf8_transaction() -> None:
    s = ehlo(new(tls=True))
    feed(s, "MAIL FROM:<jörg@example.com> SMTPUTF8\r\n".encode())
    assert feed(s, "RCPT TO:<zoë@example.org>\r\n".encode()) == wire(replies.RECIPIENT_OK)
    feed(s, b"DATA\r\n")
    tx = transaction(s.receive_data(b"x\r\n.\r\n"))
    assert (tx.sender, tx.recipients[0].address, tx.smtputf8) == ("jörg@example.com", "zoë@example.org", True)
    assert tx.protocol == "UTF8SMTPS"  # RFC 6531 §3.7.3


def test_non_ascii_rcpt_without_smtputf8() -> None:
    s = ehlo(new())
    feed(s, b"MAIL FROM:<a@example.com>\r\n")
    assert feed(s, "RCPT TO:<zoë@example.org>\r\n".encode()) == wire(replies.NON_ASCII_ADDRESS)


def test_tls_required() -> None:
    s = ehlo(new(tls_required=True))
    assert feed(s, b"MAIL FROM:<a@example.com>\r\n") == wire(replies.MUST_STARTTLS)
    s = ehlo(new(tls=True, tls_required=True))
    assert feed(s, b"MAIL FROM:<a@example.com>\r\n") == wire(replies.SENDER_OK)


# -- RCPT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "reply"),
    [
        ("user@example.org", replies.RECIPIENT_OK),
        ("USER@EXAMPLE.ORG.", replies.RECIPIENT_OK),
        ("postmaster", replies.RECIPIENT_OK),
        ("user@foreign.example", replies.RELAY_DENIED),
        ("user%foreign.example@example.org", replies.RELAY_DENIED),
        ('"user@foreign.example"@example.org', replies.RELAY_DENIED),
        ("foreign.example!user@example.org", replies.RELAY_DENIED),
        ("@example.org:user@foreign.example", replies.RELAY_DENIED),
        ("user@[192.0.2.1]", replies.RELAY_DENIED),
        ("", replies.BAD_ADDRESS),
    ],
)
def test_rcpt_relay_policy_untrusted(address: str, reply: Reply) -> None:
    s = ehlo(new(UNTRUSTED))
    feed(s, b"MAIL FROM:<a@example.com>\r\n")
    assert feed(s, f"RCPT TO:<{address}>\r\n".encode()) == wire(reply)


def test_rcpt_trusted_relays_anywhere() -> None:
    s = ehlo(new(TRUSTED))
    feed(s, b"MAIL FROM:<a@example.com>\r\n")
    assert feed(s, b"RCPT TO:<user%foreign.example@example.org>\r\n") == wire(replies.RECIPIENT_OK)
    assert feed(s, b"RCPT TO:<user@foreign.example>\r\n") == wire(replies.RECIPIENT_OK)


@pytest.mark.parametrize(
    ("params", "reply", "notify", "orcpt"),
    [
        ("NOTIFY=SUCCESS,FAILURE", replies.RECIPIENT_OK, ("SUCCESS", "FAILURE"), None),
        ("notify=never", replies.RECIPIENT_OK, ("NEVER",), None),
        ("NOTIFY=NEVER,SUCCESS", replies.BAD_PARAM_VALUE, (), None),
        ("NOTIFY=DELAY,DELAY", replies.BAD_PARAM_VALUE, (), None),
        ("NOTIFY=SOMETIMES", replies.BAD_PARAM_VALUE, (), None),
        ("NOTIFY", replies.BAD_PARAM_VALUE, (), None),
        ("ORCPT=rfc822;user+40example.org", replies.RECIPIENT_OK, (), "rfc822;user@example.org"),
        # a malformed ORCPT is dropped and the recipient kept (issue 11.2)
        ("ORCPT=rfc822", replies.RECIPIENT_OK, (), None),
        ("ORCPT=;user", replies.RECIPIENT_OK, (), None),
        ("ORCPT=rfc822;" + "x" * 500, replies.RECIPIENT_OK, (), None),
        ("ORCPT", replies.RECIPIENT_OK, (), None),
        ("ORCPT=rfc822;j+C3rg@foreign.example", replies.RECIPIENT_OK, (), None),  # not UTF-8
        ("ORCPT=rfc822;a+0Ab@foreign.example", replies.RECIPIENT_OK, (), None),  # a line break
        ("ORCPT=utf-8;j\\x{D800}rg@foreign.example", replies.RECIPIENT_OK, (), None),  # a surrogate
        # Postfix's xtext-escaped UTF-8, and RFC 6533's utf-8-addr-xtext
        ("ORCPT=rfc822;j+C3+B6rg@foreign.example", replies.RECIPIENT_OK, (), "rfc822;jörg@foreign.example"),
        ("ORCPT=utf-8;j\\x{F6}rg@foreign.example", replies.RECIPIENT_OK, (), "rfc822;jörg@foreign.example"),
        ("ORCPT=x400;c+3Dde", replies.RECIPIENT_OK, (), "x400;c=de"),
        ("NOTIFY=DELAY NOTIFY=DELAY", replies.BAD_PARAM_VALUE, (), None),
        ("SIZE=1", replies.PARAM_NOT_RECOGNIZED, (), None),
    ],
)
def test_rcpt_params(params: str, reply: Reply, notify: tuple[str, ...], orcpt: str | None) -> None:
    s = ehlo(new())
    feed(s, b"MAIL FROM:<a@example.com>\r\n")
    assert feed(s, f"RCPT TO:<b@example.org> {params}\r\n".encode()) == wire(reply)
    if reply == replies.RECIPIENT_OK:
        feed(s, b"DATA\r\n")
        tx = transaction(s.receive_data(b".\r\n"))
        assert tx.recipients == (Recipient("b@example.org", notify=notify, orcpt=orcpt),)


def test_utf8_orcpt_unitext_with_smtputf8() -> None:
    # RFC 6533 utf-8-addr-unitext: raw UTF-8, allowed when the transaction has SMTPUTF8
    s = ehlo(new())
    feed(s, b"MAIL FROM:<a@example.com> SMTPUTF8\r\n")
    line = "RCPT TO:<jörg@example.org> ORCPT=utf-8;jörg@foreign.example\r\n".encode()
    assert feed(s, line) == wire(replies.RECIPIENT_OK)
    assert s.take_notes() == []
    feed(s, b"DATA\r\n")
    [rcpt] = transaction(s.receive_data(b".\r\n")).recipients
    assert rcpt == Recipient("jörg@example.org", orcpt="rfc822;jörg@foreign.example")
    # without SMTPUTF8 the same ORCPT is dropped, noted, and the recipient kept
    s = ehlo(new())
    feed(s, b"MAIL FROM:<a@example.com>\r\n")
    assert feed(s, "RCPT TO:<j@example.org> ORCPT=utf-8;jörg@foreign.example\r\n".encode()) == wire(
        replies.RECIPIENT_OK
    )
    [note] = s.take_notes()
    assert note.text == "client.example[192.0.2.7]: ORCPT of <j@example.org> dropped: UTF-8 without SMTPUTF8"
    feed(s, b"DATA\r\n")
    assert transaction(s.receive_data(b".\r\n")).recipients == (Recipient("j@example.org"),)


def test_too_many_recipients_is_not_an_error() -> None:
    s = ehlo(new(max_recipients=2, max_errors=2))
    feed(s, b"MAIL FROM:<a@example.com>\r\nRCPT TO:<1@example.org>\r\nRCPT TO:<2@example.org>\r\n")
    for _ in range(5):
        assert feed(s, b"RCPT TO:<3@example.org>\r\n") == wire(replies.TOO_MANY_RECIPIENTS)
    assert s.errors == 0 and not s.closed
    feed(s, b"DATA\r\n")
    assert len(transaction(s.receive_data(b".\r\n")).recipients) == 2


# -- mail_gate ---------------------------------------------------------------------------------------
def test_mail_gate_at_mail() -> None:
    s = ehlo(new(mail_gate=lambda: replies.INSUFFICIENT_STORAGE, max_errors=1))
    assert feed(s, b"MAIL FROM:<a@example.com>\r\n") == wire(replies.INSUFFICIENT_STORAGE)
    assert s.state is State.READY and not s.closed


def test_mail_gate_at_end_of_data() -> None:
    full: list[Reply | None] = [None]
    s = in_data(new(mail_gate=lambda: full[0]))
    full[0] = replies.INSUFFICIENT_STORAGE
    assert s.receive_data(b"x\r\n.\r\n") == [Send(wire(replies.INSUFFICIENT_STORAGE))]
    assert s.state is State.READY and s.errors == 0


# -- mail input flow control (in_flow_delay) ----------------------------------------------------------
def test_mail_waits_for_flow_before_its_250_and_holds_pipelined_commands() -> None:
    lags = [True]
    s = ehlo(new(mail_flow=lambda: lags[0]))
    # MAIL and RCPT pipelined: nothing is answered while the MAIL waits, the RCPT stays buffered
    events = s.receive_data(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<r@example.org>\r\n")
    assert events == [AwaitFlow()]
    assert s.state is State.WAIT_FLOW and s.waiting and not s.in_transaction
    assert s.receive_data(b"DATA\r\n") == []
    lags[0] = False
    assert sent(s.flow_granted()) == wire(replies.SENDER_OK, replies.RECIPIENT_OK, replies.DATA_START)
    assert s.state in (State.DATA,)  # (mypy narrowed it to WAIT_FLOW above)
    tx = transaction(s.receive_data(b"hi\r\n.\r\n"))
    assert tx.sender == "a@example.com" and [r.address for r in tx.recipients] == ["r@example.org"]


def test_mail_without_lag_answers_at_once_and_a_stray_grant_is_ignored() -> None:
    s = ehlo(new(mail_flow=lambda: False))
    assert feed(s, b"MAIL FROM:<a@example.com>\r\n") == wire(replies.SENDER_OK)
    assert s.flow_granted() == [] and s.state is State.MAIL


def test_refused_mail_never_waits_for_flow() -> None:
    asked: list[bool] = []

    def flow() -> bool:
        asked.append(True)
        return True

    s = ehlo(new(mail_flow=flow, mail_gate=lambda: replies.INSUFFICIENT_STORAGE))
    assert feed(s, b"MAIL FROM:<a@example.com>\r\n") == wire(replies.INSUFFICIENT_STORAGE)
    assert feed(s, b"MAIL FROM:<bad\r\n")[:3] == b"501"
    assert asked == [] and s.state is State.READY


# -- DATA ------------------------------------------------------------------------------------------
def test_dot_unstuffing() -> None:
    s = in_data(new())
    tx = transaction(s.receive_data(b"..\r\n...x\r\n.y\r\n x.\r\n.\r\n"))
    assert tx.data == b".\r\n..x\r\ny\r\n x.\r\n"


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\n.\r"],
)
def test_smtp_smuggling_never_ends_data(smuggle: bytes) -> None:
    s = in_data(new(UNTRUSTED))
    payload = (
        b"Subject: legit\r\n\r\nhello"
        + smuggle
        + b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nforged\r\n.\r\n"
    )
    events = s.receive_data(payload)
    # One reply for the whole thing: the smuggled commands were message text, and the message is
    # refused because of the bare CR/LF.
    assert events == [Send(wire(replies.BARE_NEWLINE))]
    assert s.state is State.READY


@pytest.mark.parametrize("body", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"x\n"])
def test_bare_newline_rejected_after_the_dot(body: bytes) -> None:
    s = in_data(new())
    assert s.receive_data(body) == []
    assert s.receive_data(b"\r\n.\r\n") == [Send(wire(replies.BARE_NEWLINE))]


def test_dot_after_bare_lf_is_text() -> None:
    s = in_data(new())
    assert s.receive_data(b"x\n.\r\n") == []  # "\n.\r\n" is not the end (CVE-2023-51764)
    assert s.in_transaction and s.state is State.DATA
    assert s.receive_data(b".\r\n") == [Send(wire(replies.BARE_NEWLINE))]


def test_nul_rejected() -> None:
    s = in_data(new())
    assert s.receive_data(b"a\x00b\r\n.\r\n") == [Send(wire(replies.NUL_IN_MESSAGE))]


def test_text_line_limit_1000_with_crlf() -> None:
    ok = b"x" * (MAX_TEXT_LINE - 2)
    s = in_data(new(max_message_size=10_000))
    assert transaction(s.receive_data(ok + b"\r\n." + ok + b"\r\n.\r\n")).data == ok + b"\r\n" + ok + b"\r\n"
    s = in_data(new(max_message_size=10_000))
    assert s.receive_data(ok + b"x\r\n.\r\n") == [Send(wire(replies.LINE_TOO_LONG))]


def test_endless_text_line_stays_bounded() -> None:
    s = in_data(new(max_message_size=10_000_000))
    for _ in range(100):
        assert s.receive_data(b"y" * 100_000) == []
        assert s.buffered <= MAX_TEXT_LINE + 100_000
    assert s.receive_data(b"\r\n.\r\n") == [Send(wire(replies.LINE_TOO_LONG))]


def test_cr_at_chunk_edge_of_long_line_keeps_the_terminator() -> None:
    s = in_data(new())
    s.receive_data(b"z" * 5000 + b"\r")
    assert s.receive_data(b"\n.\r\n") == [Send(wire(replies.LINE_TOO_LONG))]


def test_message_size_limit_reads_on_and_stays_bounded() -> None:
    s = in_data(new(max_message_size=2000))
    line = b"z" * 98 + b"\r\n"
    for _ in range(1000):  # 100 kB
        assert s.receive_data(line) == []
        assert s.buffered <= 2000 + len(line)
    assert s.receive_data(b".\r\n") == [Send(wire(replies.MESSAGE_TOO_BIG))]
    assert s.state is State.READY


def test_message_exactly_at_the_size_limit() -> None:
    s = in_data(new(max_message_size=200))
    assert len(transaction(s.receive_data(b"z" * 98 + b"\r\n" + b"z" * 98 + b"\r\n.\r\n")).data) == 200
    s.message_stored("Q")
    s = in_data(new(max_message_size=199))
    assert s.receive_data(b"z" * 98 + b"\r\n" + b"z" * 98 + b"\r\n.\r\n") == [Send(wire(replies.MESSAGE_TOO_BIG))]


def test_data_with_argument() -> None:
    s = ehlo(new())
    feed(s, b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
    assert feed(s, b"DATA now\r\n") == wire(replies.SYNTAX_ERROR_ARGS)


# -- errors ----------------------------------------------------------------------------------------
def test_too_many_errors_closes() -> None:
    s = new(max_errors=3)
    events = s.receive_data(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert events == [
        Send(wire(replies.UNRECOGNIZED, replies.UNRECOGNIZED, replies.UNRECOGNIZED, replies.TOO_MANY_ERRORS)),
        Close(reply_sent=True),
    ]
    assert s.closed


# -- STARTTLS ----------------------------------------------------------------------------------------
def test_starttls_discards_pipelined_plaintext() -> None:
    s = ehlo(new(UNTRUSTED))
    events = s.receive_data(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n")
    assert events == [Send(wire(replies.STARTTLS_READY)), StartTLS()]
    assert s.waiting and s.buffered == 0
    assert s.receive_data(b"RCPT TO:<more@example.org>\r\n") == []
    assert s.tls_started() == []
    assert s.tls and s.helo == "" and not s.waiting
    # Everything before TLS is forgotten: EHLO again (RFC 3207 §4.2).
    assert feed(s, b"MAIL FROM:<a@example.com>\r\n") == wire(replies.BAD_SEQUENCE)
    out = feed(s, b"EHLO client.example\r\n")
    assert b"STARTTLS" not in out and b"AUTH PLAIN LOGIN" in out
    assert feed(s, b"STARTTLS\r\n") == wire(replies.TLS_ALREADY_ACTIVE)


@pytest.mark.parametrize(
    ("kw", "line", "reply"),
    [
        ({}, b"STARTTLS now\r\n", replies.SYNTAX_ERROR_ARGS),
        ({"tls_available": False}, b"STARTTLS\r\n", replies.TLS_NOT_AVAILABLE),
    ],
)
def test_starttls_refusals(kw: dict[str, Any], line: bytes, reply: Reply) -> None:
    assert feed(ehlo(new(**kw)), line) == wire(reply)


def test_starttls_before_ehlo_is_allowed() -> None:
    s = new()
    assert s.receive_data(b"STARTTLS\r\n") == [Send(wire(replies.STARTTLS_READY)), StartTLS()]


def test_tls_started_out_of_turn_is_ignored() -> None:
    s = ehlo(new())
    assert s.tls_started() == [] and not s.tls


# -- AUTH --------------------------------------------------------------------------------------------
def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def authed_session(**kw: Any) -> Session:
    return ehlo(new(UNTRUSTED, tls=True, **kw))


def test_auth_plain_initial_response_and_success() -> None:
    s = authed_session()
    events = s.receive_data(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n".encode())
    assert events == [Authenticate("PLAIN", "", "alice", "s3cret")]
    assert s.waiting
    assert s.auth_result(True) == [Send(wire(replies.AUTH_OK))]
    assert s.auth_user == "alice"
    # Authenticated clients relay anywhere; protocol ESMTPSA (RFC 3848).
    feed(s, b"MAIL FROM:<alice@example.com>\r\n")
    assert feed(s, b"RCPT TO:<bob@foreign.example>\r\n") == wire(replies.RECIPIENT_OK)
    feed(s, b"DATA\r\n")
    tx = transaction(s.receive_data(b"hi\r\n.\r\n"))
    assert (tx.protocol, tx.auth_user) == ("ESMTPSA", "alice")
    assert feed(s, b"") == b""
    s.message_stored("Q")
    assert feed(s, b"AUTH PLAIN\r\n") == wire(replies.AUTH_ALREADY)


def test_auth_plain_with_continuation_and_failure() -> None:
    s = authed_session()
    assert feed(s, b"AUTH PLAIN\r\n") == b"334 \r\n"
    events = s.receive_data(f"{b64('admin' + chr(0) + 'alice' + chr(0) + 'pw')}\r\n".encode())
    assert events == [Authenticate("PLAIN", "admin", "alice", "pw")]
    assert s.auth_result(False) == [Send(wire(replies.AUTH_FAILED))]
    assert s.auth_user is None and s.errors == 1


def test_auth_login() -> None:
    s = authed_session()
    assert feed(s, b"AUTH LOGIN\r\n") == wire(replies.LOGIN_USERNAME)
    assert feed(s, f"{b64('alice')}\r\n".encode()) == wire(replies.LOGIN_PASSWORD)
    assert s.receive_data(f"{b64('pw')}\r\n".encode()) == [Authenticate("LOGIN", "", "alice", "pw")]


def test_auth_login_with_initial_username() -> None:
    s = authed_session()
    assert feed(s, f"AUTH LOGIN {b64('alice')}\r\n".encode()) == wire(replies.LOGIN_PASSWORD)


def test_input_after_auth_waits_for_the_verdict() -> None:
    s = authed_session()
    events = s.receive_data(f"AUTH PLAIN {b64(chr(0) + 'a' + chr(0) + 'b')}\r\nNOOP\r\n".encode())
    assert events == [Authenticate("PLAIN", "", "a", "b")]
    assert s.auth_result(True) == [Send(wire(replies.AUTH_OK, replies.OK))]


@pytest.mark.parametrize(
    ("script", "reply"),
    [
        (b"AUTH PLAIN\r\n*\r\n", replies.AUTH_CANCELLED),
        (b"AUTH LOGIN\r\n*\r\n", replies.AUTH_CANCELLED),
        (b"AUTH PLAIN *\r\n", replies.AUTH_CANCELLED),
        (b"AUTH PLAIN\r\n!!!notbase64\r\n", replies.AUTH_BAD_BASE64),
        (b"AUTH PLAIN bm9udWxscw==\r\n", replies.AUTH_BAD_BASE64),  # "nonulls": not authzid\0user\0pw
        (b"AUTH CRAM-MD5\r\n", replies.AUTH_MECHANISM_UNKNOWN),
        (b"AUTH\r\n", replies.SYNTAX_ERROR_ARGS),
    ],
)
def test_auth_refusals(script: bytes, reply: Reply) -> None:
    s = authed_session()
    assert feed(s, script).endswith(wire(reply))
    assert s.state is State.READY and s.auth_user is None


def test_auth_requires_tls_and_configuration() -> None:
    assert feed(ehlo(new()), b"AUTH PLAIN\r\n") == wire(replies.ENCRYPTION_REQUIRED_FOR_AUTH)
    assert feed(ehlo(new(tls=True, auth_available=False)), b"AUTH PLAIN\r\n") == wire(replies.AUTH_NOT_AVAILABLE)
    s = new(tls=True)
    feed(s, b"HELO x\r\n")
    assert feed(s, b"AUTH PLAIN\r\n") == wire(replies.BAD_SEQUENCE)  # RFC 4954: after EHLO
    s = authed_session()
    feed(s, b"MAIL FROM:<a@example.com>\r\n")
    assert feed(s, b"AUTH PLAIN\r\n") == wire(replies.BAD_SEQUENCE)


def test_password_never_in_repr_or_replies() -> None:
    s = authed_session()
    events = s.receive_data(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'hunter2')}\r\n".encode())
    assert "hunter2" not in repr(events) and "hunter2" not in str(events[0])
    assert b"hunter2" not in sent(events + s.auth_result(False))


# -- timeouts, shutdown, eof ---------------------------------------------------------------------------
def test_timeout_and_shutdown() -> None:
    assert new().timeout() == [Send(wire(replies.TIMEOUT)), Close()]
    assert new().shutdown() == [Send(wire(replies.SHUTTING_DOWN)), Close()]


def test_eof() -> None:
    s = in_data(new())
    s.receive_data(b"partial message\r\n")
    assert s.eof() == [Close(reply_sent=False)]
    assert s.closed and s.receive_data(b".\r\n") == []


def test_eof_while_storing_then_stored() -> None:
    s = in_data(new())
    transaction(s.receive_data(b"x\r\n.\r\n"))
    assert s.eof() == [Close(reply_sent=False)]
    assert s.message_stored("Q") == []


def test_stored_out_of_turn_is_ignored() -> None:
    s = ehlo(new())
    assert s.message_stored("Q") == [] and s.message_failed(replies.STORAGE_FAILED) == []
    assert s.auth_result(True) == [] and s.auth_user is None


def test_too_much_pipelined_input_while_waiting() -> None:
    s = in_data(new())
    transaction(s.receive_data(b"x\r\n.\r\n"))
    assert s.receive_data(b"NOOP\r\n" * (MAX_BUFFER_WHILE_WAITING // 6 + 10)) == []
    assert s.buffered <= MAX_BUFFER_WHILE_WAITING
    assert s.message_stored("Q") == [Send(wire(replies.queued("Q"), PIPELINE_OVERFLOW)), Close()]


# -- misc ------------------------------------------------------------------------------------------------
def test_xtext() -> None:
    assert xtext_decode("a+2Bb+3D") == "a+b="
    for bad in ("a=b", "a+2", "a b", "+00"):
        with pytest.raises(ValueError):
            xtext_decode(bad)


def test_from_settings() -> None:
    st = Settings(hostname="h.example", relay_domains="Example.ORG.", tls_cert="c.pem", tls_key="k.pem")
    cfg = SessionConfig.from_settings(st, max_errors=5)
    assert cfg.hostname == "h.example" and cfg.max_errors == 5
    assert cfg.relay_domains == frozenset({"example.org"})
    assert cfg.tls_available and not cfg.auth_available
    assert ipaddress.ip_network("127.0.0.0/8") in cfg.networks
    assert cfg.mail_gate() is None
