"""The sans-IO SMTP client (common/smtp/client.py), in memory: against our own ingress Session and
against scripted (misbehaving) servers, pipelined and lock-step, no sockets."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.envelope import RcptState
from common.smtp.client import (
    Client,
    Closed,
    NeedTLS,
    Ready,
    Refused,
    TransactionDone,
    TransactionResult,
    dot_stuffed,
)
from ingress.session import Close, Peer, Send, Session, SessionConfig, StartTLS, Transaction

RELAY = "mx.example.net[192.0.2.1]:25"


def new_client(**kw: Any) -> Client:
    return Client("mta.example.org", RELAY, **kw)


# -- a scripted server ----------------------------------------------------------------------------


@dataclass
class Script:
    """Replies by step; ``None`` for a step means the server hangs up there instead of answering.
    ``delivery``: how replies reach the client: all at once ("batch"), one reply per receive_data
    call, answering a pipelined batch lock-step ("lockstep"), or one octet at a time ("bytes")."""

    greeting: str | None = "220 mx.example.net ESMTP"
    ehlo: str | None = "250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME"
    helo: str | None = "250 mx.example.net"
    starttls: str | None = "220 2.0.0 go ahead"
    mail: str | None = "250 2.1.0 Ok"
    rcpt: Callable[[str], str | None] = lambda addr: "250 2.1.5 Ok"
    data: str | None = "354 End data with <CR><LF>.<CR><LF>"
    end: str | None = "250 2.0.0 Ok: queued"
    rset: str | None = "250 2.0.0 Ok"
    noop: str | None = "250 2.0.0 Ok"
    hangup_after_end: bool = False
    delivery: str = "batch"
    commands: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)


def run(client: Client, script: Script, *, then: Callable[[Client], None] | None = None) -> list[object]:
    """Drive ``client`` against ``script`` until it has nothing more to say; returns its events.
    ``then(client)`` is called at the first Ready (to start a transaction)."""
    events: list[object] = []
    inbuf = b""
    in_body = False
    started = False
    hung_up = False
    good_rcpts = 0  # in the current transaction: a real server says 503 to DATA without one

    def answer(reply: str | None) -> bytes | None:
        return None if reply is None else (reply + "\r\n").encode()

    pending_replies: list[bytes] = []
    greeting = answer(script.greeting)
    if greeting is None:
        client.eof()
    else:
        pending_replies.append(greeting)
    for _ in range(1000):
        # the server's side: deliver replies as the script says
        if pending_replies:
            if script.delivery == "batch":
                client.receive_data(b"".join(pending_replies))
            elif script.delivery == "bytes":
                for chunk in pending_replies:
                    for i in range(len(chunk)):
                        client.receive_data(chunk[i : i + 1])
            else:  # lockstep: one reply per read
                for chunk in pending_replies:
                    client.receive_data(chunk)
            pending_replies = []
        if hung_up:
            client.eof()
            hung_up = False
        while (ev := client.next_event()) is not None:
            events.append(ev)
            if isinstance(ev, NeedTLS):
                client.tls_started()
            if isinstance(ev, Ready) and not started and then is not None:
                started = True
                then(client)
        out = client.data_to_send()
        if not out:
            if client.closed or not client._expect:
                break
            continue
        inbuf += out
        while inbuf and not hung_up:
            if in_body:
                end = inbuf.find(b"\r\n.\r\n")
                if end < 0 and inbuf != b".\r\n":
                    break
                if inbuf.startswith(b".\r\n"):
                    body, inbuf = b"", inbuf[3:]
                else:
                    body, inbuf = inbuf[: end + 2], inbuf[end + 5 :]
                script.bodies.append(body)
                in_body = False
                reply = answer(script.end)
                if reply is None:
                    hung_up = True
                else:
                    pending_replies.append(reply)
                    if script.hangup_after_end:
                        hung_up = True
                continue
            line, sep, rest = inbuf.partition(b"\r\n")
            if not sep:
                break
            inbuf = rest
            cmd = line.decode("utf-8")
            script.commands.append(cmd)
            verb = cmd.split(" ", 1)[0].upper()
            reply_text: str | None
            if verb == "EHLO":
                reply_text = script.ehlo
            elif verb == "HELO":
                reply_text = script.helo
            elif verb == "STARTTLS":
                reply_text = script.starttls
            elif verb == "MAIL":
                reply_text = script.mail
                good_rcpts = -1 if reply_text is None or not reply_text.startswith("2") else 0
            elif verb == "RCPT":
                reply_text = script.rcpt(cmd[9:-1])
                if good_rcpts >= 0 and reply_text is not None and reply_text.startswith("2"):
                    good_rcpts += 1
            elif verb == "DATA":
                reply_text = script.data if good_rcpts > 0 else "503 5.5.1 Error: need RCPT command"
                if reply_text is not None and reply_text.startswith("354"):
                    in_body = True
            elif verb == "RSET":
                reply_text = script.rset
            elif verb == "NOOP":
                reply_text = script.noop
            elif verb == "QUIT":
                reply_text = "221 2.0.0 Bye"
            else:
                reply_text = "502 5.5.2 what?"
            reply = answer(reply_text)
            if reply is None:
                hung_up = True
                break
            pending_replies.append(reply)
            if reply_text is not None and reply_text.startswith("421"):
                hung_up = True
                break
    return events


def transact(
    script: Script, rcpts: list[str] | None = None, body: bytes = b"Subject: t\r\n\r\nhi\r\n", **kw: bool
) -> tuple[TransactionResult | None, Client, list[object]]:
    client = new_client(**kw)
    rcpts = rcpts if rcpts is not None else ["a@x.test", "b@x.test"]
    events = run(client, script, then=lambda c: c.start_transaction("s@y.test", rcpts, body, []))
    done = [e for e in events if isinstance(e, TransactionDone)]
    assert len(done) <= 1
    return (done[0].result if done else None), client, events


def codes(result: TransactionResult | None) -> dict[int, int]:
    assert result is not None
    return {i: r.code for i, r in result.replies.items()}


PIPELINED = "250-mx.example.net\r\n250-PIPELINING\r\n250 8BITMIME"
LOCKSTEP = "250-mx.example.net\r\n250 8BITMIME"
MODES = [
    pytest.param(PIPELINED, "batch", id="pipelined"),
    pytest.param(PIPELINED, "lockstep", id="pipelined-answered-lockstep"),
    pytest.param(PIPELINED, "bytes", id="pipelined-byte-by-byte"),
    pytest.param(LOCKSTEP, "batch", id="lockstep"),
]


# -- the session setup ----------------------------------------------------------------------------


def test_greeting_ehlo_and_extensions() -> None:
    client = new_client()
    events = run(client, Script(ehlo="250-mx\r\n250-PIPELINING\r\n250-SIZE 5000\r\n250 8BITMIME"))
    assert [type(e) for e in events] == [Ready]
    assert client.supports("pipelining") and client.supports("8BITMIME") and not client.supports("smtputf8")
    assert client.size_limit == 5000


@pytest.mark.parametrize("code", ["421 4.3.2 busy", "450 4.7.1 later", "554 5.7.1 go away"])
def test_greeting_other_than_220_is_a_refusal(code: str) -> None:
    client = new_client()
    events = run(client, Script(greeting=code))
    refused = [e for e in events if isinstance(e, Refused)]
    assert refused and refused[0].reply is not None and str(refused[0].reply) == code
    assert "refused to talk to me" in refused[0].text
    assert client.closed


@pytest.mark.parametrize("code", ["421 4.7.0 too busy", "450 4.3.2 not now"])
def test_4xx_to_ehlo_is_a_refusal_not_a_cue_for_helo(code: str) -> None:
    script = Script(ehlo=code)
    events = run(new_client(), script)
    assert any(isinstance(e, Refused) and e.reply and e.reply.code == int(code[:3]) for e in events)
    assert not any(c.startswith("HELO") for c in script.commands)


def test_5xx_to_ehlo_falls_back_to_helo() -> None:
    script = Script(ehlo="502 5.5.2 no EHLO here")
    client = new_client()
    events = run(client, script)
    assert [c.split()[0] for c in script.commands] == ["EHLO", "HELO"]
    assert isinstance(events[-1], Ready) and not client.esmtp and not client.supports("pipelining")


def test_helo_refused_is_a_refusal() -> None:
    events = run(new_client(), Script(ehlo="500 5.5.1 eh?", helo="550 5.7.1 not you"))
    assert any(isinstance(e, Refused) and "refused HELO" in e.text for e in events)


@pytest.mark.parametrize("step", ["greeting", "ehlo"])
def test_hangup_during_greeting(step: str) -> None:
    client = new_client()
    events = run(client, Script(**{step: None}))  # type: ignore[arg-type]
    refused = [e for e in events if isinstance(e, Refused)]
    assert refused and refused[0].reply is None and "lost connection with" in refused[0].text
    assert isinstance(events[-1], Closed)


def test_timeout_during_greeting() -> None:
    client = new_client()
    client.timed_out()
    ev = client.next_event()
    assert isinstance(ev, Refused) and ev.timed_out and "timed out" in ev.text


def test_starttls_when_offered_then_ehlo_again() -> None:
    script = Script(ehlo="250-mx\r\n250-STARTTLS\r\n250 PIPELINING")
    client = new_client()
    events = run(client, script)
    assert [c.split()[0] for c in script.commands] == ["EHLO", "STARTTLS", "EHLO"]
    assert isinstance(events[0], NeedTLS) and isinstance(events[-1], Ready) and client.tls


def test_starttls_refused_goes_on_in_plain_text() -> None:
    script = Script(ehlo="250-mx\r\n250 STARTTLS", starttls="454 4.7.0 TLS not available")
    client = new_client()
    events = run(client, script)
    assert isinstance(events[-1], Ready) and not client.tls


def test_no_starttls_when_told_not_to() -> None:
    script = Script(ehlo="250-mx\r\n250 STARTTLS")
    run(new_client(try_tls=False), script)
    assert "STARTTLS" not in script.commands


def test_garbage_reply_breaks_the_session() -> None:
    client = new_client()
    client.receive_data(b"hello there\r\n")
    ev = client.next_event()
    assert isinstance(ev, Refused) and "bad reply" in ev.text
    assert client.closed


# -- transactions: every reply class at every step, pipelined and lock-step -----------------------


@pytest.mark.parametrize(("ehlo", "delivery"), MODES)
def test_all_accepted(ehlo: str, delivery: str) -> None:
    script = Script(ehlo=ehlo, delivery=delivery)
    result, client, _ = transact(script)
    assert codes(result) == {0: 250, 1: 250}
    assert result is not None and not result.broken
    assert client.ready and "RSET" not in script.commands  # the server resets by itself
    assert script.bodies == [b"Subject: t\r\n\r\nhi\r\n"]


@pytest.mark.parametrize(("ehlo", "delivery"), MODES)
@pytest.mark.parametrize("reply", ["451 4.3.0 later", "550 5.7.1 no", "452 4.3.1 full"])
def test_mail_refused_decides_everyone(ehlo: str, delivery: str, reply: str) -> None:
    script = Script(ehlo=ehlo, delivery=delivery, mail=reply)
    result, client, _ = transact(script)
    assert codes(result) == {0: int(reply[:3]), 1: int(reply[:3])}
    assert result is not None and not result.broken
    assert script.bodies == [] and client.ready and script.commands[-1] == "RSET"


@pytest.mark.parametrize(("ehlo", "delivery"), MODES)
@pytest.mark.parametrize("reply", ["450 4.2.0 busy", "550 5.1.1 no such user"])
def test_one_rcpt_refused(ehlo: str, delivery: str, reply: str) -> None:
    script = Script(ehlo=ehlo, delivery=delivery, rcpt=lambda a: reply if a.startswith("a@") else "250 ok")
    result, client, _ = transact(script)
    assert codes(result) == {0: int(reply[:3]), 1: 250}
    assert len(script.bodies) == 1 and client.ready


@pytest.mark.parametrize(("ehlo", "delivery"), MODES)
def test_every_rcpt_refused_sends_no_message(ehlo: str, delivery: str) -> None:
    script = Script(ehlo=ehlo, delivery=delivery, rcpt=lambda a: "550 5.1.1 unknown", data="554 5.5.1 no rcpt")
    result, client, _ = transact(script)
    assert codes(result) == {0: 550, 1: 550}
    assert script.bodies == [] and client.ready


@pytest.mark.parametrize(("ehlo", "delivery"), MODES)
@pytest.mark.parametrize("reply", ["451 4.3.0 no", "554 5.7.1 refused"])
def test_data_refused_decides_the_accepted(ehlo: str, delivery: str, reply: str) -> None:
    script = Script(ehlo=ehlo, delivery=delivery, rcpt=lambda a: "550 no" if a.startswith("b@") else "250 ok")
    script.data = reply
    result, client, _ = transact(script)
    assert codes(result) == {0: int(reply[:3]), 1: 550}
    assert script.bodies == [] and client.ready and script.commands[-1] == "RSET"


@pytest.mark.parametrize(("ehlo", "delivery"), MODES)
@pytest.mark.parametrize("reply", ["250 2.0.0 ok", "452 4.3.1 out of space", "554 5.7.1 spam"])
def test_end_of_data_reply_decides_the_accepted(ehlo: str, delivery: str, reply: str) -> None:
    script = Script(ehlo=ehlo, delivery=delivery, end=reply)
    result, client, _ = transact(script)
    assert codes(result) == {0: int(reply[:3]), 1: int(reply[:3])}
    assert client.ready
    assert ("RSET" in script.commands) == (not reply.startswith("2"))


@pytest.mark.parametrize(("ehlo", "delivery"), MODES)
@pytest.mark.parametrize("step", ["mail", "rcpt", "data", "end"])
def test_421_mid_transaction_decides_the_rest_and_closes(ehlo: str, delivery: str, step: str) -> None:
    closing = "421 4.7.0 Error: too many errors"
    script = Script(ehlo=ehlo, delivery=delivery)
    if step == "rcpt":
        # the first RCPT is refused for good, then the server gives up: the 550 stands
        script.rcpt = lambda a: "550 5.1.1 unknown" if a.startswith("a@") else closing
    else:
        setattr(script, step, closing)
    result, client, events = transact(script)
    assert result is not None and result.broken
    expected = {0: 550, 1: 421} if step == "rcpt" else {0: 421, 1: 421}
    assert codes(result) == expected
    assert client.closed and isinstance(events[-1], Closed)


@pytest.mark.parametrize(("ehlo", "delivery"), MODES)
@pytest.mark.parametrize("step", ["mail", "rcpt", "data", "end"])
def test_hangup_mid_transaction_keeps_what_was_said(ehlo: str, delivery: str, step: str) -> None:
    script = Script(ehlo=ehlo, delivery=delivery)
    if step == "rcpt":
        script.rcpt = lambda a: "550 5.1.1 unknown" if a.startswith("a@") else None
    else:
        setattr(script, step, None)
    result, client, _ = transact(script)
    assert result is not None and result.broken and not result.timed_out
    assert codes(result) == ({0: 550} if step == "rcpt" else {})
    assert client.closed


@pytest.mark.parametrize(("ehlo", "delivery"), MODES)
def test_hangup_right_after_250_to_data_still_delivers(ehlo: str, delivery: str) -> None:
    script = Script(ehlo=ehlo, delivery=delivery, hangup_after_end=True)
    result, client, events = transact(script)
    assert codes(result) == {0: 250, 1: 250}
    assert result is not None and not result.broken
    assert client.closed and isinstance(events[-1], Closed)


def test_timeout_waiting_for_end_of_data() -> None:
    client = new_client()
    run(client, Script(delivery="batch"))
    client.start_transaction("s@y.test", ["a@x.test"], b"x\r\n", [])
    client.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    client.timed_out()
    events = client.events()
    done = [e for e in events if isinstance(e, TransactionDone)]
    assert done and done[0].result.broken and done[0].result.timed_out and done[0].result.replies == {}


def test_pipelined_writes_one_batch_lockstep_writes_one_command() -> None:
    for ehlo, first_write in ((PIPELINED, 4), (LOCKSTEP, 1)):
        client = new_client()
        run(client, Script(ehlo=ehlo))
        client.start_transaction("s@y.test", ["a@x.test", "b@x.test"], b"x\r\n", [])
        lines = client.data_to_send().split(b"\r\n")[:-1]
        assert len(lines) == first_write
        assert lines[0] == b"MAIL FROM:<s@y.test>"


def test_mail_parameters_and_null_sender() -> None:
    script = Script()
    client = new_client()
    run(client, script, then=lambda c: c.start_transaction("", ["a@x.test"], b"x\r\n", ["SIZE=3", "BODY=8BITMIME"]))
    assert "MAIL FROM:<> SIZE=3 BODY=8BITMIME" in script.commands


def test_utf8_address_needs_smtputf8() -> None:
    client = new_client()
    run(client, Script())
    with pytest.raises(ValueError):
        client.start_transaction("s@y.test", ["jörg@x.test"], b"x\r\n", [])
    assert client.ready  # nothing was written
    client.start_transaction("s@y.test", ["jörg@x.test"], b"x\r\n", ["SMTPUTF8"])
    assert "jörg".encode() in client.data_to_send()


def dot_stuff(body: bytes) -> bytes:
    """The data the client sends for ``body``: its pieces in order."""
    return b"".join(dot_stuffed(body))


def test_dot_stuffing() -> None:
    assert dot_stuff(b".a\r\nb\r\n..c") == b"..a\r\nb\r\n...c\r\n.\r\n"
    assert dot_stuff(b"") == b"\r\n.\r\n"
    assert dot_stuff(b"a.\r\n.\r\n\r\n.") == b"a.\r\n..\r\n\r\n..\r\n.\r\n"


@given(st.binary(max_size=300))
def test_dot_stuffing_is_what_unstuffing_undoes(body: bytes) -> None:
    """Every line that starts with a dot has been given one more (RFC 5321 §4.5.2): taking one off
    every such line, as the receiver does, gives the body back (with its final CRLF)."""
    data = dot_stuff(body)
    assert data.endswith(b"\r\n.\r\n")
    lines = data[:-3].split(b"\n")
    unstuffed = b"\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    assert unstuffed == (body if body.endswith(b"\r\n") else body + b"\r\n")


@given(st.lists(st.sampled_from([b".", b"..", b"\r\n", b"\n", b"a", b"b.c", b"1.2.3.4.5.6.7.8.9.0.1.2.3.4.5.6.7"])))
def test_dot_stuffing_many_dots(pieces: list[bytes]) -> None:
    """Past line_dot's memchr hops (DOT_HOPS dots inside lines) a line that starts with a dot is
    still stuffed: each line gets exactly one more dot than it had, wherever it is."""
    body = b"".join(pieces)
    lines = dot_stuff(body)[:-3].split(b"\n")
    want = (body if body.endswith(b"\r\n") else body + b"\r\n").split(b"\n")
    assert lines == [b"." + w if w.startswith(b".") else w for w in want]


def test_a_body_without_dot_lines_is_sent_as_it_is() -> None:
    """No copy of the body: dot_stuffed gives it back itself, and the client's parts carry it."""
    body = b"Subject: big\r\n\r\n" + b"a.b c\r\n" * 5000
    lead, middle, tail = dot_stuffed(body)
    assert (lead, middle, tail) == (b"", body, b".\r\n") and middle is body
    assert dot_stuffed(b".x") == (b".", b".x", b"\r\n.\r\n")
    client = new_client()
    sent: list[list[bytes]] = []

    def start(c: Client) -> None:
        c.start_transaction("s@y.test", ["r@x.test"], body, [])

    script = Script(end="250 2.0.0 Ok: queued")
    run(client, script, then=start)  # the whole conversation, through data_to_send
    assert script.bodies == [body]
    client = new_client()
    client.receive_data(b"220 mx\r\n")
    client.receive_data(b"250-mx\r\n250 PIPELINING\r\n")
    sent.append(client.parts_to_send())
    assert isinstance(client.next_event(), Ready)
    client.start_transaction("s@y.test", ["r@x.test"], body, [])
    sent.append(client.parts_to_send())
    client.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    parts = client.parts_to_send()
    assert any(p is body for p in parts) and b"".join(parts) == body + b".\r\n"
    assert client.parts_to_send() == [] and client.data_to_send() == b""
    assert sent[0] == [b"EHLO mta.example.org\r\n"]


def test_noop_on_an_idle_session() -> None:
    client = new_client()
    run(client, Script())
    client.noop()
    assert client.data_to_send() == b"NOOP\r\n"
    client.receive_data(b"250 ok\r\n")
    assert isinstance(client.next_event(), Ready)
    client.noop()
    client.data_to_send()
    client.receive_data(b"421 4.4.2 idle too long\r\n")
    assert client.data_to_send() == b"QUIT\r\n"


def test_multiline_reply_is_joined() -> None:
    script = Script(end="250-2.0.0 Ok\r\n250 queued as X")
    result, _, _ = transact(script, rcpts=["a@x.test"])
    assert result is not None and str(result.replies[0]) == "250 2.0.0 Ok queued as X"
    assert (result.replies[0].enhanced, result.replies[0].text) == ("2.0.0", "Ok queued as X")


# -- against our own ingress Session ----------------------------------------------------------------


def converse(
    client: Client, session: Session, work: Callable[[Client], None]
) -> tuple[list[object], list[Transaction]]:
    """Bytes back and forth between the client and mtaq's own server session."""
    events: list[object] = []
    stored: list[Transaction] = []
    started = False
    server_events = session.start()
    for _ in range(200):
        to_client = b""
        for ev in server_events:
            if isinstance(ev, Send):
                to_client += ev.data
            elif isinstance(ev, Transaction):
                stored.append(ev)
                server_events.extend(session.message_stored(f"Q{len(stored)}"))
            elif isinstance(ev, StartTLS):
                server_events.extend(session.tls_started())
            elif isinstance(ev, Close):
                client.receive_data(to_client)
                client.eof()
                to_client = b""
        server_events = []
        if to_client:
            client.receive_data(to_client)
        while (ev2 := client.next_event()) is not None:
            events.append(ev2)
            if isinstance(ev2, NeedTLS):
                client.tls_started()
            if isinstance(ev2, Ready) and not started:
                started = True
                work(client)
            elif isinstance(ev2, (Ready, TransactionDone)) and started and client.ready:
                client.quit()
        out = client.data_to_send()
        if not out:
            if client.closed:
                break
            continue
        server_events = session.receive_data(out)
    return events, stored


OUTSIDER = Peer("203.0.113.9", 40000)


def our_session(max_recipients: int = 3, peer: Peer = OUTSIDER) -> Session:
    config = SessionConfig(
        hostname="mx.mtaq.test",
        max_message_size=10_000,
        max_recipients=max_recipients,
        networks=(ipaddress.ip_network("192.0.2.0/24"),),
        relay_domains=frozenset({"x.test"}),
    )
    return Session(config, peer)


def test_against_our_session_delivers_with_pipelining() -> None:
    client = new_client()
    body = b"Subject: hi\r\n\r\n.leading dot\r\n"
    events, stored = converse(
        client, our_session(), lambda c: c.start_transaction("s@y.test", ["a@x.test", "b@x.test"], body, ["SIZE=40"])
    )
    done = [e for e in events if isinstance(e, TransactionDone)]
    assert codes(done[0].result) == {0: 250, 1: 250}
    assert client.supports("pipelining")
    assert len(stored) == 1 and stored[0].data == body
    assert [r.address for r in stored[0].recipients] == ["a@x.test", "b@x.test"]
    assert client.closed


def test_against_our_session_per_recipient_refusals() -> None:
    client = new_client()
    rcpts = ["a@x.test", "b@elsewhere.test", "c@x.test", "d@x.test", "e@x.test"]  # relay denied, over the limit
    events, stored = converse(client, our_session(), lambda c: c.start_transaction("s@y.test", rcpts, b"x\r\n", []))
    done = next(e for e in events if isinstance(e, TransactionDone)).result
    assert done.replies[0].code == 250 and done.replies[2].code == 250
    assert done.replies[1].outcome is RcptState.BOUNCED  # relay access denied
    assert done.replies[4].outcome is RcptState.DEFERRED  # 452 too many recipients: a later transaction takes it
    assert len(stored) == 1 and len(stored[0].recipients) == 3


# -- probes (address verification: ingress/verify.py) -------------------------------------------------


def probe(script: Script, rcpts: list[str]) -> tuple[TransactionResult | None, Client, list[object]]:
    client = new_client(try_tls=False)
    events = run(client, script, then=lambda c: c.start_probe("", rcpts, []))
    done = [e for e in events if isinstance(e, TransactionDone)]
    assert len(done) <= 1
    return (done[0].result if done else None), client, events


@pytest.mark.parametrize(("ehlo", "delivery"), MODES)
def test_probe_asks_mail_and_rcpt_then_quits_without_data(ehlo: str, delivery: str) -> None:
    script = Script(ehlo=ehlo, delivery=delivery, rcpt=lambda a: "550 5.1.1 no such user" if "gone" in a else "250 ok")
    result, client, events = probe(script, ["bob@x.test", "gone@x.test"])
    assert script.commands[1:] == ["MAIL FROM:<>", "RCPT TO:<bob@x.test>", "RCPT TO:<gone@x.test>", "QUIT"]
    assert script.bodies == []
    assert result is not None and not result.broken
    assert {i: str(r) for i, r in result.replies.items()} == {0: "250 ok", 1: "550 5.1.1 no such user"}
    assert result.mail is not None and result.mail.positive
    assert isinstance(events[-1], Closed) and client.closed


@pytest.mark.parametrize(("ehlo", "delivery"), MODES)
def test_probe_with_a_refused_mail_says_so(ehlo: str, delivery: str) -> None:
    script = Script(ehlo=ehlo, delivery=delivery, mail="550 5.7.1 no null sender here")
    result, client, _ = probe(script, ["bob@x.test"])
    assert result is not None and result.mail is not None and result.mail.code == 550
    assert str(result.replies[0]) == "550 5.7.1 no null sender here"  # MAIL's reply decides
    assert "DATA" not in script.commands and script.commands[-1] == "QUIT" and client.closed


def test_probe_cut_short_by_421_is_broken() -> None:
    result, client, _ = probe(Script(rcpt=lambda a: "421 4.3.2 going down"), ["bob@x.test"])
    assert result is not None and result.broken and result.replies[0].code == 421
    assert client.closed


def test_a_transaction_reports_its_mail_reply_too() -> None:
    result, _, _ = transact(Script(), rcpts=["a@x.test"])
    assert result is not None and result.mail is not None and str(result.mail) == "250 2.1.0 Ok"
