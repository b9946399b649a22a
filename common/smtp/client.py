"""The SMTP client as a pure, sans-IO state machine (the client half of what ingress/session.py is
for the server).

Replies go in (``receive_data``, ``eof``, ``timed_out``), commands come out (``data_to_send``) and
events come out (``next_event``): ``Ready`` when the session may take a transaction, ``NeedTLS``
when the driver must wrap the socket (then ``tls_started``), ``Refused`` when the server will not
talk to us, ``TransactionDone`` with one reply per recipient, ``Closed`` when the session is over.
No sockets, no threads, no clock: the drivers own all IO (worker/smtpclient.py over blocking
sockets for deliveries; ingress/verify.py over asyncio streams for its probes, ``start_probe``).

One reply interpreter serves pipelined and lock-step servers: every command sent is put on a list of
expected replies, and each reply read is matched to the head of that list, whatever was written
meanwhile. With PIPELINING (RFC 2920) MAIL, every RCPT and DATA are written at once; without it
the next command is written after each reply. Either way a reply means the same thing:

- MAIL refused: that reply decides every recipient (pipelined RCPT replies are read and ignored).
- RCPT refused: that reply decides the recipient; no RCPT accepted: no message is sent.
- DATA refused (no 354): that reply decides the accepted recipients.
- the end-of-data reply decides the accepted recipients.
- 421 at any step: the server is closing (RFC 5321 §3.8); that reply decides every recipient
  still undecided (as Postfix reports it), the replies read before it stand.
- a 4xx to EHLO is a refusal (the server is telling us to go away), a 5xx to EHLO means "try HELO".

With ``auth`` (a smarthost's credentials, worker/smarthost.py) the session also requires TLS: no
STARTTLS offered, STARTTLS refused, or only HELO is a ``Refused`` before any credential is written;
after TLS, AUTH PLAIN (or LOGIN when that is all the server offers, RFC 4954) comes before
``Ready``, and a refusal of it is ``Refused`` with ``auth=True`` (the driver defers: it is our
configuration, not the recipient's fault). Whether the certificate is valid is the driver's check.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from common.envelope import RcptState
from common.smtp.reply import Reply
from common.smtp.text import line_dot

__all__ = [
    "Client",
    "ClientEvent",
    "Closed",
    "NeedTLS",
    "Ready",
    "Refused",
    "TransactionDone",
    "TransactionResult",
    "dot_stuffed",
]

_REPLY_LINE = re.compile(rb"^([2-5]\d\d)([ -])(.*)$")
# A server reply line longer than this is a broken server (RFC 5321 §4.5.3.1.5 says 512).
MAX_REPLY_LINE = 4096
# More lines than this in one reply: a server that never ends its reply.
MAX_REPLY_LINES = 256


@dataclass(slots=True)
class TransactionResult:
    # recipient position in the list given -> the reply that decided it (MAIL's, RCPT's or DATA's)
    replies: dict[int, Reply]
    # True when the connection broke (or the server said 421) before every recipient had a reply
    broken: bool = False
    timed_out: bool = False  # ...because the server stopped answering (Postfix: "timed out")
    mail: Reply | None = None  # MAIL's own reply (a refused MAIL decides every recipient)


# -- events


@dataclass(frozen=True, slots=True)
class Ready:
    """The session takes a transaction now (after the greeting and EHLO, or after the last one)."""


@dataclass(frozen=True, slots=True)
class NeedTLS:
    """The server said 220 to STARTTLS: wrap the socket, then call ``tls_started``."""


@dataclass(frozen=True, slots=True)
class Refused:
    """No usable session: ``text`` says why in Postfix's words; ``reply`` is the server's, if any."""

    text: str
    reply: Reply | None = None
    timed_out: bool = False
    auth: bool = False  # the server refused our credentials (or we could not send them safely)


@dataclass(frozen=True, slots=True)
class TransactionDone:
    result: TransactionResult


@dataclass(frozen=True, slots=True)
class Closed:
    """The session is over: the driver closes the socket."""


ClientEvent = Ready | NeedTLS | Refused | TransactionDone | Closed


class Phase(str, Enum):
    GREETING = "greeting"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    TLS = "tls"  # waiting for the driver's handshake
    AUTH = "auth"  # RFC 4954 exchange with a smarthost
    READY = "ready"
    MAIL = "mail"  # a transaction in progress (commands out, replies due)
    BODY = "body"  # 354 read, message sent, end-of-data reply due
    RSET = "rset"
    NOOP = "noop"
    QUIT = "quit"
    CLOSED = "closed"


@dataclass(slots=True)
class _Transaction:
    sender: str
    recipients: list[str]
    body: bytes
    options: list[str]
    encoding: str
    pipelined: bool
    probe: bool = False  # MAIL and RCPT only, then QUIT: address verification (start_probe)
    mail: Reply | None = None
    next_rcpt: int = 0  # lock-step: the next RCPT to write
    rcpt_seen: int = 0  # RCPT replies read
    accepted: list[int] = field(default_factory=list)
    replies: dict[int, Reply] = field(default_factory=dict)
    end: Reply | None = None  # the end-of-data reply


def dot_stuffed(body: bytes) -> tuple[bytes, bytes, bytes]:
    """RFC 5321 §4.5.2 in three pieces whose concatenation is the data to send: a line starting
    with '.' gets another, and the data ends with CRLF.CRLF. The middle piece is ``body`` itself
    (no copy of a large message) unless a line after the first starts with a dot; a line starts
    after LF (or at the start). Whether one does is a memchr over the dots (common/smtp/text.py),
    not a search for LF-dot, which tried every line (0.75 ms a MiB); the stuffing itself is
    bytes.replace, a C loop (a regex with ``^`` in multi-line mode tried every position)."""
    lead = b"." if body.startswith(b".") else b""
    middle = body.replace(b"\n.", b"\n..") if line_dot(body) >= 0 else body
    tail = b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n"
    return lead, middle, tail


def _path(address: str) -> str:
    return f"<{address}>"


class Client:
    """One SMTP client session. ``relay`` (``host[ip]:port``) only words the diagnostics."""

    def __init__(
        self, helo_name: str, relay: str, *, try_tls: bool = True, auth: tuple[str, str] | None = None
    ) -> None:
        self.helo_name = helo_name
        self.relay = relay
        self.try_tls = try_tls or auth is not None
        self._auth = auth  # (username, password): never in a log or a repr
        self.authenticated = False
        self.phase = Phase.GREETING
        self.esmtp = False
        self.tls = False
        self.extensions: dict[str, str] = {}  # EHLO keyword (lower case) -> its parameters
        self._out = bytearray()
        self._parts: list[bytes] = []  # written before _out: whole pieces, a message body uncopied
        self._in = bytearray()
        self._lines: list[bytes] = []  # lines of a multi-line reply read so far
        self._events: deque[ClientEvent] = deque()
        self._expect: deque[str] = deque()  # what each reply still due answers: MAIL, RCPT, DATA ...
        self._tx: _Transaction | None = None
        self.last_reply: Reply | None = None

    # -- what the driver asks

    def supports(self, extension: str) -> bool:
        return self.esmtp and extension.lower() in self.extensions

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def size_limit(self) -> int:
        """The server's SIZE (RFC 1870), 0 when it gave none."""
        value = self.extensions.get("size", "").strip()
        return int(value) if value.isdigit() else 0

    def data_to_send(self) -> bytes:
        parts = self.parts_to_send()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def parts_to_send(self) -> list[bytes]:
        """What ``data_to_send`` says, in pieces to write in order: a message body comes as it was
        given, not copied into the commands around it (a 1 MiB body was copied three times)."""
        self._seal()
        parts, self._parts = self._parts, []
        return parts

    def _seal(self) -> None:
        """What ``_out`` holds becomes a piece of its own, after those before it."""
        if self._out:
            self._parts.append(bytes(self._out))
            self._out.clear()

    def next_event(self) -> ClientEvent | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[ClientEvent]:
        out = list(self._events)
        self._events.clear()
        return out

    # -- what the driver reports

    def receive_data(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._in += data
        while not self.closed:
            end = self._in.find(b"\n")
            if end < 0:
                if len(self._in) > MAX_REPLY_LINE:
                    self._broken("bad reply (line too long)")
                return
            line = bytes(self._in[:end]).rstrip(b"\r")
            del self._in[: end + 1]
            m = _REPLY_LINE.match(line) or (_REPLY_LINE.match(line + b" ") if len(line) == 3 else None)
            if m is None or (self._lines and self._lines[0][:3] != line[:3]):
                self._broken(f"bad reply {line[:80]!r}")
                return
            self._lines.append(line)
            if m.group(2) == b"-":
                if len(self._lines) > MAX_REPLY_LINES:
                    self._broken("bad reply (too many lines)")
                continue
            code = int(m.group(1))
            reply = Reply.parse(code, b" ".join(ln[4:] for ln in self._lines))
            keywords = [ln[4:] for ln in self._lines[1:]]
            self._lines = []
            self.last_reply = reply
            self._on_reply(reply, keywords)

    def eof(self) -> None:
        """The server closed the connection."""
        if self.phase in (Phase.QUIT, Phase.CLOSED):
            self._close()
            return
        self._broken("Connection closed by remote host")

    def timed_out(self) -> None:
        """The server did not answer within the driver's timeout."""
        if self.phase in (Phase.QUIT, Phase.CLOSED):
            self._close()
            return
        self._broken("Connection timed out", timed_out=True)

    def tls_started(self) -> None:
        """The driver finished the TLS handshake: say EHLO again (RFC 3207 §4.2)."""
        assert self.phase is Phase.TLS
        self.tls = True
        self.extensions = {}
        self._send_ehlo()

    # -- what the driver wants done

    def start_transaction(self, sender: str, recipients: list[str], body: bytes, options: list[str]) -> None:
        """One mail transaction; its result comes as ``TransactionDone``. ``options`` are the MAIL
        parameters; SMTPUTF8 among them lets addresses be UTF-8. Raises ValueError for an address
        the session cannot carry (non-ASCII without SMTPUTF8), before anything is written."""
        self._start(sender, recipients, body, options, probe=False)

    def start_probe(self, sender: str, recipients: list[str], options: list[str]) -> None:
        """Ask whether the server would take mail for ``recipients`` and send none (address
        verification, as Postfix's verify probes): MAIL, RCPT, then QUIT in place of DATA. The
        result comes as ``TransactionDone`` (an accepted recipient's reply is its RCPT reply; a
        refused MAIL's reply decides every recipient and is ``result.mail``), then ``Closed``."""
        self._start(sender, recipients, b"", options, probe=True)

    def _start(self, sender: str, recipients: list[str], body: bytes, options: list[str], *, probe: bool) -> None:
        assert self.phase is Phase.READY, self.phase
        if not recipients:
            raise ValueError("a transaction needs a recipient")
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        for addr in [sender, *recipients]:
            addr.encode(encoding)  # UnicodeEncodeError is a ValueError
            if "\r" in addr or "\n" in addr:
                raise ValueError(f"bad address {addr!r}")
        tx = _Transaction(sender, list(recipients), body, list(options), encoding, self.supports("pipelining"), probe)
        self._tx = tx
        self.phase = Phase.MAIL
        opts = "".join(" " + o for o in options)
        self._command(f"MAIL FROM:{_path(sender)}{opts}", "MAIL", encoding)
        if tx.pipelined:
            for r in tx.recipients:
                self._command(f"RCPT TO:{_path(r)}", "RCPT", encoding)
            tx.next_rcpt = len(tx.recipients)
            if not probe:
                self._command("DATA", "DATA")

    def noop(self) -> None:
        """Prove the idle session still lives (a cached connection): ``Ready`` or ``Closed``."""
        assert self.phase is Phase.READY
        self.phase = Phase.NOOP
        self._command("NOOP", "NOOP")

    def quit(self) -> None:
        if self.phase in (Phase.CLOSED, Phase.QUIT):
            return
        self.phase = Phase.QUIT
        self._command("QUIT", "QUIT")

    # -- internals

    def _command(self, line: str, expect: str, encoding: str = "ascii") -> None:
        self._out += line.encode(encoding) + b"\r\n"
        self._expect.append(expect)

    def _send_ehlo(self) -> None:
        self.phase = Phase.EHLO
        self._command(f"EHLO {self.helo_name}", "EHLO")

    def _refuse(self, text: str, reply: Reply | None = None) -> None:
        self._events.append(Refused(text, reply))
        self.quit()

    def _broken(self, why: str, *, timed_out: bool = False) -> None:
        """The connection is unusable: whatever was under way ends with what is known."""
        phase = self.phase
        if phase in (Phase.MAIL, Phase.BODY) and self._tx is not None:
            self._finish(broken=True, timed_out=timed_out)
        elif phase in (Phase.GREETING, Phase.EHLO, Phase.HELO, Phase.STARTTLS, Phase.TLS):
            if timed_out:
                text = f"conversation with {self.relay} timed out during greeting"
            else:
                text = f"lost connection with {self.relay} during greeting: {why}"
            self._events.append(Refused(text, None, timed_out))
        self._close()

    def _close(self) -> None:
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self._expect.clear()
            self._events.append(Closed())

    def _on_reply(self, reply: Reply, keywords: list[bytes]) -> None:
        expect = self._expect.popleft() if self._expect else ("GREETING" if self.phase is Phase.GREETING else "")
        if expect == "GREETING":
            if reply.code != 220:
                self._refuse(f"host {self.relay} refused to talk to me: {reply}", reply)
            else:
                self._send_ehlo()
        elif expect == "EHLO":
            if reply.positive:
                self.esmtp = True
                self.extensions = {}
                for kw in keywords:
                    word, _, params = kw.decode("ascii", "replace").partition(" ")
                    self.extensions[word.lower()] = params
                if self.try_tls and not self.tls and "starttls" in self.extensions:
                    self.phase = Phase.STARTTLS
                    self._command("STARTTLS", "STARTTLS")
                elif self._auth is not None:
                    self._authenticate()
                else:
                    self._ready()
            elif reply.outcome is RcptState.DEFERRED:
                # RFC 5321 §4.1.4: HELO is the fallback for a server that does not know EHLO (5xx);
                # a 4xx (421: closing) is the server refusing us now, and it has likely hung up
                self._refuse(f"host {self.relay} refused to talk to me: {reply}", reply)
            else:
                self.phase = Phase.HELO
                self._command(f"HELO {self.helo_name}", "HELO")
        elif expect == "HELO":
            if reply.code == 250 and self._auth is not None:
                self._refuse_auth(f"host {self.relay} does not speak ESMTP: no TLS, credentials not sent")
            elif reply.code == 250:
                self.esmtp = False
                self.extensions = {}
                self._ready()
            else:
                self._refuse(f"host {self.relay} refused HELO: {reply}", reply)
        elif expect == "STARTTLS":
            if reply.code == 220:
                self.phase = Phase.TLS
                self._events.append(NeedTLS())
            elif reply.code == 421:
                self._refuse(f"host {self.relay} refused to talk to me: {reply}", reply)
            elif self._auth is not None:
                self._refuse_auth(f"host {self.relay} refused STARTTLS ({reply}): credentials not sent")
            else:
                self._ready()  # STARTTLS offered but refused: opportunistic TLS goes on in plain text
        elif expect in ("AUTH", "AUTH-USER", "AUTH-PASS"):
            self._on_auth_reply(expect, reply)
        elif expect in ("MAIL", "RCPT", "DATA", "BODY"):
            self._on_transaction_reply(expect, reply)
        elif expect == "RSET" or expect == "NOOP":
            if reply.code == 250:
                self._ready()
            else:
                self.quit()
        elif expect == "QUIT":
            self._close()
        elif expect == "IGNORE":
            if reply.code == 421:
                self._close()
        else:
            self._broken(f"unexpected reply {reply}")

    def _ready(self) -> None:
        self.phase = Phase.READY
        self._events.append(Ready())

    # -- AUTH (RFC 4954) with a smarthost, only ever under TLS

    def _refuse_auth(self, text: str, reply: Reply | None = None) -> None:
        self._events.append(Refused(text, reply, auth=True))
        self.quit()

    def _authenticate(self) -> None:
        assert self._auth is not None
        if not self.tls:
            self._refuse_auth(f"host {self.relay} offered no STARTTLS: credentials not sent")
            return
        mechanisms = self.extensions.get("auth", "").upper().split()
        user, password = self._auth
        self.phase = Phase.AUTH
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
            self._command(f"AUTH PLAIN {token}", "AUTH")
        elif "LOGIN" in mechanisms:
            self._command("AUTH LOGIN", "AUTH-USER")
        else:
            self._refuse_auth(f"host {self.relay} offered no AUTH PLAIN or LOGIN: credentials not sent")

    def _on_auth_reply(self, expect: str, reply: Reply) -> None:
        assert self._auth is not None
        if expect == "AUTH" and reply.code == 235:
            self.authenticated = True
            self._ready()
        elif expect != "AUTH" and reply.code == 334:
            secret = self._auth[0] if expect == "AUTH-USER" else self._auth[1]
            self._command(
                base64.b64encode(secret.encode()).decode("ascii"), "AUTH-PASS" if expect == "AUTH-USER" else "AUTH"
            )
        else:
            self._refuse_auth(f"SASL authentication failed; server {self.relay} said: {reply}", reply)

    def _on_transaction_reply(self, what: str, reply: Reply) -> None:
        tx = self._tx
        assert tx is not None
        if reply.code == 421:
            # the server closes (RFC 5321 §3.8): it decides what is left; what was said before stands
            self._finish(closing=reply)
            return
        if what == "MAIL":
            tx.mail = reply
            if not reply.positive:
                for i in range(len(tx.recipients)):
                    tx.replies[i] = reply
                if not tx.pipelined:
                    self._finish()
            elif not tx.pipelined:
                self._next_rcpt()
        elif what == "RCPT":
            i = tx.rcpt_seen
            tx.rcpt_seen += 1
            if tx.mail is None or not tx.mail.positive:
                # pipelined after a refused MAIL: MAIL's reply decides; a probe ends at the last
                if tx.probe and tx.rcpt_seen == len(tx.recipients):
                    self._finish()
                return
            if reply.positive:
                tx.accepted.append(i)
            if not reply.positive or tx.probe:
                tx.replies[i] = reply
            if not tx.pipelined:
                self._next_rcpt()
            elif tx.probe and tx.rcpt_seen == len(tx.recipients):
                self._finish()
        elif what == "DATA":
            if reply.code != 354:
                # a refused DATA decides the accepted recipients (the server had no valid one, or
                # refuses the message); a pipelined refused MAIL keeps deciding them
                for i in tx.accepted:
                    tx.replies[i] = reply
                self._finish()
            elif not tx.accepted or tx.mail is None or not tx.mail.positive:
                # a server that said 354 without a valid recipient: end the empty message
                self.phase = Phase.BODY
                self._out += b".\r\n"
                self._expect.append("BODY")
                tx.accepted = []
            else:
                self.phase = Phase.BODY
                lead, middle, tail = dot_stuffed(tx.body)
                self._out += lead
                self._seal()
                self._parts.append(middle)  # the body as given: never copied into _out
                self._out += tail
                self._expect.append("BODY")
        else:  # BODY: the end-of-data reply
            tx.end = reply
            for i in tx.accepted:
                tx.replies[i] = reply
            self._finish()

    def _next_rcpt(self) -> None:
        tx = self._tx
        assert tx is not None
        if tx.next_rcpt < len(tx.recipients):
            self._command(f"RCPT TO:{_path(tx.recipients[tx.next_rcpt])}", "RCPT", tx.encoding)
            tx.next_rcpt += 1
        elif tx.accepted and not tx.probe:
            self._command("DATA", "DATA")
        else:
            self._finish()  # no recipient accepted: no DATA

    def _finish(self, *, closing: Reply | None = None, broken: bool = False, timed_out: bool = False) -> None:
        tx = self._tx
        assert tx is not None
        self._tx = None
        replies = dict(tx.replies)
        if closing is not None:
            for i in range(len(tx.recipients)):
                replies.setdefault(i, closing)
        complete = len(replies) == len(tx.recipients)
        result = TransactionResult(
            replies, broken=broken or closing is not None or not complete, timed_out=timed_out, mail=tx.mail
        )
        self._events.append(TransactionDone(result))
        if closing is not None or broken:
            self._close()
            return
        if tx.probe:
            self.quit()  # a probe session ends here: the server never sees DATA
            return
        # replies still due (pipelined RCPTs and DATA after a refused MAIL) are read by the RSET
        # phase: the server is reset either way
        if tx.end is not None and tx.end.positive and not self._expect:
            self._ready()  # after a good transaction the server is reset by itself (RFC 5321 §4.1.1.4)
        else:
            self.phase = Phase.RSET
            self._drain_then_rset()

    def _drain_then_rset(self) -> None:
        # Replies to commands already written (a pipelined batch cut short by a refused DATA) come
        # before RSET's: they are read and dropped.
        self._expect = deque(["IGNORE"] * len(self._expect))
        self._command("RSET", "RSET")
