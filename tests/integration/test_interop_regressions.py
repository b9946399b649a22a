"""Regressions found by interop runs against Postfix (smtpd, smtp-sink, smtp-source) and swaks,
reproduced here with our own code only: the tests need neither Postfix nor swaks.

``PostfixLikeServer`` is a line-by-line SMTP server on loopback that does what Postfix's smtpd does
and aiosmtpd cannot be scripted to do: after ``hard_error_limit`` refused commands it answers the
next command ``421 4.7.0 Error: too many errors`` and hangs up (smtpd_hard_error_limit), and
``ehlo_421`` answers EHLO with 421 and hangs up (smtp-sink -Q EHLO, a server shedding load).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

import dns.resolver
import pytest

from common.envelope import Envelope, RcptState, Recipient, new_queue_id
from common.mx import MXResolver
from worker.lane import Lane
from worker.parcel import Parcel, Undeliverable, default_left, fail_all
from worker.relay import Dialer, converse, resolve
from worker.smtpclient import SMTPConnection

TOO_MANY_ERRORS = "421 4.7.0 pfb.test Error: too many errors"


class _NoJob:
    """A lane's owner for a conversation outside a delivery job: nothing to record."""

    def record(self, parcel: Parcel, positions: list[int]) -> None:
        pass

    def done(self, parcel: Parcel) -> None:
        pass


def deliver_once(destination: str, parcels: list[Parcel], *, resolver: MXResolver, port: int) -> None:
    """One conversation with ``destination`` for ``parcels``, as a job's would be (outcomes filled
    in for every recipient), without the delivery service around it."""
    try:
        found = resolve(resolver, destination, port)
    except Undeliverable as e:
        fail_all(parcels, e.outcome)
        return
    lane = Lane(found)
    lane.add(parcels, _NoJob())
    opened, _ = converse(lane, Dialer("mtaq.test", port, 5.0, 5.0))
    if opened is not None:
        opened.conn.quit()
    lane.left()
    default_left(parcels, lane.last)


class PostfixLikeServer:
    def __init__(
        self,
        *,
        reject: dict[str, str] | None = None,
        hard_error_limit: int | None = None,
        pipelining: bool = True,
        ehlo_421: bool = False,
    ) -> None:
        self.reject = reject or {}
        self.hard_error_limit = hard_error_limit
        self.pipelining = pipelining
        self.ehlo_421 = ehlo_421
        self.commands: list[str] = []
        self.delivered: list[list[str]] = []  # the recipients of each message taken
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> PostfixLikeServer:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")  # buffered, as Postfix's vstream: pipelined input is read ahead

        def say(line: str) -> None:
            conn.sendall(line.encode() + b"\r\n")

        def hang_up(line: str) -> None:
            say(line)
            conn.shutdown(socket.SHUT_WR)  # FIN after the reply, then discard what the client still sends
            while rfile.read(4096):
                pass

        say("220 pfb.test ESMTP Postfix")
        errors = 0
        rcpts: list[str] = []
        while True:
            raw = rfile.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\r\n")
            verb = line.split(" ", 1)[0].upper()
            self.commands.append(line)
            if self.hard_error_limit is not None and errors >= self.hard_error_limit:
                hang_up(TOO_MANY_ERRORS)
                return
            if verb == "EHLO":
                if self.ehlo_421:
                    hang_up("421 4.7.0 pfb.test Service not available, closing transmission channel")
                    return
                say("250-pfb.test")
                if self.pipelining:
                    say("250-PIPELINING")
                say("250 8BITMIME")
            elif verb == "HELO":
                say("250 pfb.test")
            elif verb == "MAIL":
                rcpts = []
                say("250 2.1.0 Ok")
            elif verb == "RCPT":
                addr = line.split(":", 1)[1].strip().strip("<>")
                if addr in self.reject:
                    errors += 1
                    say(self.reject[addr])
                else:
                    rcpts.append(addr)
                    say("250 2.1.5 Ok")
            elif verb == "DATA":
                if not rcpts:
                    say("554 5.5.1 Error: no valid recipients")
                    continue
                say("354 End data with <CR><LF>.<CR><LF>")
                while rfile.readline() not in (b".\r\n", b""):
                    pass
                self.delivered.append(rcpts)
                say("250 2.0.0 Ok: queued as 4F2A")
            elif verb in ("RSET", "NOOP"):
                say("250 2.0.0 Ok")
            elif verb == "QUIT":
                say("221 2.0.0 Bye")
                return
            else:
                say("502 5.5.2 Error: command not recognized")


BAD = {
    "bad1@y.test": "554 5.1.1 <bad1@y.test>: Recipient address rejected: no such user here",
    "bad2@y.test": "554 5.7.1 <bad2@y.test>: Recipient address rejected: policy says no",
}
RCPTS = ["bad1@y.test", "bad2@y.test", "ok1@y.test", "ok2@y.test"]


def _connect(port: int) -> SMTPConnection:
    conn = SMTPConnection(helo_name="mtaq.test", connect_timeout=5, timeout=5)
    conn.open("127.0.0.1", port)
    return conn


@pytest.mark.parametrize("pipelining", [True, False])
def test_replies_read_before_a_421_hangup_are_kept(pipelining: bool) -> None:
    """Postfix's smtpd refused two RCPTs (554), then said 421 (smtpd_hard_error_limit) and hung up.
    The 554s are final answers; they used to be thrown away with the broken connection (pipelined),
    and every recipient was deferred as "lost connection"."""
    with PostfixLikeServer(reject=BAD, hard_error_limit=2, pipelining=pipelining) as server:
        conn = _connect(server.port)
        result = conn.send("alice@x.test", RCPTS, b"Subject: t\r\n\r\nx\r\n")
    assert result.broken
    assert not conn.alive
    codes = {i: (r.code, r.dsn) for i, r in result.replies.items()}
    assert codes == {0: (554, "5.1.1"), 1: (554, "5.7.1"), 2: (421, "4.7.0"), 3: (421, "4.7.0")}
    assert "too many errors" in result.replies[3].text


@pytest.mark.parametrize("pipelining", [True, False])
def test_refused_recipients_bounce_and_the_rest_go_on_the_next_try(pipelining: bool) -> None:
    """The whole point of keeping those replies: the next attempt sends only the good recipients,
    which Postfix then takes. Before the fix the same four RCPTs went out on every retry, the server
    cut the session at the same place, and ok1/ok2 were never delivered."""
    env = Envelope(id=new_queue_id(), sender="alice@x.test", recipients=[Recipient(a) for a in RCPTS])
    parcel = Parcel(env, b"Subject: t\r\n\r\nx\r\n", list(range(len(RCPTS))))
    resolver = MXResolver(dns.resolver.Resolver(configure=False))
    with PostfixLikeServer(reject=BAD, hard_error_limit=2, pipelining=pipelining) as server:
        dest = f"[127.0.0.1]:{server.port}"
        deliver_once(dest, [parcel], resolver=resolver, port=25)
        first = dict(parcel.outcomes)
        assert [first[i].state for i in range(4)] == [
            RcptState.BOUNCED,
            RcptState.BOUNCED,
            RcptState.DEFERRED,
            RcptState.DEFERRED,
        ]
        assert first[0].dsn == "5.1.1" and "554 5.1.1 <bad1@y.test>" in first[0].reply
        assert first[1].dsn == "5.7.1"
        assert first[2].dsn == "4.7.0" and "421 4.7.0" in first[2].reply and "too many errors" in first[2].reply
        assert first[2].relay == f"127.0.0.1[127.0.0.1]:{server.port}"
        assert parcel.pending() == [2, 3]
        deliver_once(dest, [parcel], resolver=resolver, port=25)
    assert [parcel.outcomes[i].state for i in range(4)] == [
        RcptState.BOUNCED,
        RcptState.BOUNCED,
        RcptState.DELIVERED,
        RcptState.DELIVERED,
    ]
    assert server.delivered == [["ok1@y.test", "ok2@y.test"]]


def test_421_to_ehlo_defers_with_the_servers_reply_and_no_helo() -> None:
    """smtp-sink -Q EHLO: a 421 to EHLO is the server closing, not "I do not know EHLO". It used to
    be followed by HELO on the dead connection and logged as "lost connection ... relay=none"."""
    env = Envelope(id=new_queue_id(), sender="alice@x.test", recipients=[Recipient("u1@y.test")])
    parcel = Parcel(env, b"Subject: t\r\n\r\nx\r\n", [0])
    resolver = MXResolver(dns.resolver.Resolver(configure=False))
    with PostfixLikeServer(ehlo_421=True) as server:
        deliver_once(f"[127.0.0.1]:{server.port}", [parcel], resolver=resolver, port=25)
    out = parcel.outcomes[0]
    assert out.state is RcptState.DEFERRED
    assert out.dsn == "4.7.0"
    assert out.relay == f"127.0.0.1[127.0.0.1]:{server.port}"
    assert "refused to talk to me: 421 4.7.0" in out.reply
    assert [c.split(" ")[0].upper() for c in server.commands] == ["EHLO"]
