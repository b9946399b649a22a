"""The SMTP server session as a pure, sans-IO state machine (in the manner of h11).

Bytes go in (``receive_data``), events come out (``Send``, ``Transaction``, ``StartTLS``,
``Authenticate``, ``Close``). No sockets, no asyncio, no Redis: the caller owns all IO and reports
back with ``message_stored``/``message_failed``, ``tls_started`` and ``auth_result``.

Everything that decides which command is allowed when lives in ``TRANSITIONS``; a verb missing
from the current state's row is answered ``503 5.5.1``. Handlers only validate arguments: on
failure the state does not change, on success it becomes the table's target (AUTH alone refines
its target into "read a continuation line" or "wait for the verdict").

Choices where the RFCs leave room (following Postfix):
- Lines end at LF in the command phase (a bare LF is tolerated), but only CRLF.CRLF ends DATA.
  A bare CR or LF inside DATA rejects the message (550 5.6.0) once the real end arrives, so that
  none of the SMTP smuggling sequences (``\\n.\\n``, ``\\n.\\r\\n``, ``\\r.\\r``, ``\\r\\n.\\n``) can end a
  message or start a command.
- 8-bit octets in DATA without BODY=8BITMIME are accepted, as Postfix does (RFC 6152 leaves the
  server free; refusing them only hurts legitimate but sloppy clients).
- DATA before any accepted RCPT is ``503 5.5.1`` (a miss in the table).
- Paths without angle brackets are accepted (Postfix ``strict_rfc821_envelopes = no``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from common.envelope import Recipient
from ingress import policy, replies
from ingress.replies import Reply

if TYPE_CHECKING:
    from common.settings import Settings

__all__ = [
    "KNOWN_VERBS",
    "MAX_AUTH_LINE",
    "MAX_BUFFERED_LINE",
    "MAX_BUFFER_WHILE_WAITING",
    "MAX_COMMAND_LINE",
    "MAX_ENVID",
    "MAX_MAIL_LINE",
    "MAX_ORCPT",
    "MAX_RCPT_LINE",
    "MAX_TEXT_LINE",
    "PIPELINE_OVERFLOW",
    "TRANSITIONS",
    "Authenticate",
    "Close",
    "Event",
    "Peer",
    "Send",
    "Session",
    "SessionConfig",
    "StartTLS",
    "State",
    "Transaction",
    "xtext_decode",
]

# -- limits ----------------------------------------------------------------------------------------
# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, verb and CRLF included.
MAX_COMMAND_LINE = 512
# MAIL grows by what each advertised extension adds to it: " SIZE=" + 20 digits = 26 (RFC 1870 §3),
# " BODY=8BITMIME" = 14 (RFC 6152), " SMTPUTF8" = 9 (RFC 6531), " RET=HDRS" = 9 and
# " ENVID=" + 100 = 107 (RFC 3461 §4.3/§4.4), " AUTH=" + 500 = 506 (RFC 4954 §5).
MAX_MAIL_LINE = MAX_COMMAND_LINE + 26 + 14 + 9 + 9 + 107 + 506
# RCPT grows by " NOTIFY=SUCCESS,FAILURE,DELAY" = 29 and " ORCPT=" + 500 = 507 (RFC 3461 §4.1/§4.2).
MAX_RCPT_LINE = MAX_COMMAND_LINE + 29 + 507
# RFC 4954 §4: an AUTH command line or SASL response line may be up to 12288 octets.
MAX_AUTH_LINE = 12288
# A partial command line (no LF yet) longer than every limit above is discarded as it arrives.
MAX_BUFFERED_LINE = max(MAX_COMMAND_LINE, MAX_MAIL_LINE, MAX_RCPT_LINE, MAX_AUTH_LINE)
# RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF, i.e. 998 of content. It is
# measured after dot-unstuffing, so on the wire a stuffed line may be 1001 octets (as aiosmtpd).
MAX_TEXT_LINE = 1000
# RFC 3461 §4.4: ENVID is at most 100 characters; §4.2: ORCPT at most 500.
MAX_ENVID = 100
MAX_ORCPT = 500
# Input pipelined (RFC 2920) while a Transaction/Authenticate is outstanding. A client cannot send
# a message body before our 354, so legitimate input here is a group of commands: at most
# max_recipients RCPT lines of MAX_RCPT_LINE octets, ~1 MiB for Postfix's default of 1000. Beyond
# this the session answers the outstanding event, then 421 4.7.0 and closes.
MAX_BUFFER_WHILE_WAITING = 1 << 20

PIPELINE_OVERFLOW = Reply(421, "4.7.0", "Error: too much pipelined input")


# -- configuration and events ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Peer:
    ip: str
    port: int
    name: str = "unknown"  # verified reverse name, or "unknown"


def _no_gate() -> Reply | None:
    return None


@dataclass(frozen=True)
class SessionConfig:
    hostname: str
    max_message_size: int
    max_recipients: int
    max_errors: int = 20
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    relay_domains: frozenset[str] = frozenset()
    tls_available: bool = False
    tls_required: bool = False
    auth_available: bool = False
    # Called at MAIL and at the end of DATA; returns a Reply (e.g. 452 4.3.1) to refuse while the
    # queue is full, or None. Injected so the session stays pure.
    mail_gate: Callable[[], Reply | None] = _no_gate

    @classmethod
    def from_settings(cls, s: Settings, **kw: object) -> SessionConfig:
        base = cls(
            hostname=s.hostname,
            max_message_size=s.max_message_size,
            max_recipients=s.max_recipients,
            max_errors=s.max_errors,
            networks=tuple(s.networks),
            relay_domains=s.relay_domain_set,
            tls_available=bool(s.tls_cert),
            tls_required=s.tls_required,
            auth_available=bool(s.auth_file),
        )
        return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the client (one or more complete reply lines)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Transaction:
    """A complete message. The server stores it, then calls message_stored() or message_failed()."""

    sender: str
    recipients: tuple[Recipient, ...]
    data: bytes  # dot-unstuffed, CRLF line endings, without the final ".\r\n"
    helo: str
    protocol: str
    body_8bit: bool
    smtputf8: bool
    ret: str | None
    envid: str | None
    auth_user: str | None


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Upgrade the socket now (the 220 reply went out in the Send before), then call tls_started()."""


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Verify these credentials, then call auth_result(ok)."""

    mechanism: str
    authzid: str
    username: str
    password: str

    def __repr__(self) -> str:
        return (
            f"Authenticate(mechanism={self.mechanism!r}, authzid={self.authzid!r}, "
            f"username={self.username!r}, password='***')"
        )

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection after writing the pending Sends. reply_sent: a final reply (221/421) went
    out; False when the client closed first."""

    reply_sent: bool = True


Event = Send | Transaction | StartTLS | Authenticate | Close


# -- the state machine -----------------------------------------------------------------------------
class State(str, Enum):
    CONNECTED = "connected"  # greeted, no HELO/EHLO yet
    READY = "ready"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient accepted yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading the message
    AUTH_INPUT = "auth_input"  # reading a SASL response line
    WAIT_STORE = "wait_store"  # Transaction outstanding
    WAIT_TLS = "wait_tls"  # StartTLS outstanding
    WAIT_AUTH = "wait_auth"  # Authenticate outstanding
    CLOSED = "closed"


def _row(here: State, **more: State) -> dict[str, State]:
    """Verbs allowed in every command state, plus ``more``."""
    anytime = {
        "NOOP": here,
        "VRFY": here,
        "EXPN": here,
        "HELP": here,
        "EHLO": State.READY,
        "HELO": State.READY,
        "QUIT": State.CLOSED,
    }
    return anytime | more


# {state: {verb: state after the verb succeeds}}. A verb not in its state's row: 503 5.5.1.
TRANSITIONS: dict[State, dict[str, State]] = {
    State.CONNECTED: _row(State.CONNECTED, RSET=State.CONNECTED, STARTTLS=State.WAIT_TLS),
    State.READY: _row(State.READY, RSET=State.READY, STARTTLS=State.WAIT_TLS, AUTH=State.WAIT_AUTH, MAIL=State.MAIL),
    State.MAIL: _row(State.MAIL, RSET=State.READY, RCPT=State.RCPT),
    State.RCPT: _row(State.RCPT, RSET=State.READY, RCPT=State.RCPT, DATA=State.DATA),
}
KNOWN_VERBS = frozenset(verb for row in TRANSITIONS.values() for verb in row)
_WAITING = frozenset({State.WAIT_STORE, State.WAIT_TLS, State.WAIT_AUTH})
_IN_TRANSACTION = frozenset({State.MAIL, State.RCPT, State.DATA, State.WAIT_STORE})
_LINE_LIMIT = {b"MAIL": MAX_MAIL_LINE, b"RCPT": MAX_RCPT_LINE, b"AUTH": MAX_AUTH_LINE}


class _ArgError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def xtext_decode(value: str) -> str:
    """RFC 3461 §4: xtext = *( xchar / "+" 2HEXCHAR ), xchar = "!".."~" except "+" and "=".
    The decoded value must be printable ASCII (it ends up in DSN headers). Raises ValueError."""
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            digits = value[i + 1 : i + 3]
            if len(digits) != 2 or any(d not in "0123456789ABCDEFabcdef" for d in digits):
                raise ValueError("bad xtext escape")
            ch = chr(int(digits, 16))
            i += 3
        elif "!" <= ch <= "~" and ch != "=":
            i += 1
        else:
            raise ValueError("bad xtext character")
        if not " " <= ch <= "~":
            raise ValueError("non-printable xtext value")
        out.append(ch)
    return "".join(out)


def _split_path(arg: str, keyword: str) -> tuple[str, list[str]]:
    """``FROM:<path> params`` -> (``<path>``, params). A space after the colon is tolerated."""
    if arg[: len(keyword)].upper() != keyword:
        raise _ArgError(replies.SYNTAX_ERROR_ARGS)
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest:
        raise _ArgError(replies.SYNTAX_ERROR_ARGS)
    if rest.startswith("<"):
        quoted = False
        i = 1
        while i < len(rest):
            ch = rest[i]
            if quoted:
                if ch == "\\":
                    i += 1
                elif ch == '"':
                    quoted = False
            elif ch == '"':
                quoted = True
            elif ch == ">":
                break
            i += 1
        else:
            raise _ArgError(replies.BAD_ADDRESS)
        path, tail = rest[: i + 1], rest[i + 1 :]
        if tail and not tail.startswith(" "):
            raise _ArgError(replies.SYNTAX_ERROR_ARGS)
    else:
        path, _, tail = rest.partition(" ")
    return path, tail.split(" ") if tail.strip(" ") else []


def _params(items: list[str]) -> dict[str, str | None]:
    """ESMTP parameters (RFC 5321 §4.1.2 esmtp-param); keywords upper-cased; duplicates 501."""
    out: dict[str, str | None] = {}
    for item in items:
        if not item:
            continue  # several spaces between parameters
        key, eq, value = item.partition("=")
        key = key.upper()
        if not key or (eq and not value):
            raise _ArgError(replies.BAD_PARAM_VALUE)
        if key in out:
            raise _ArgError(replies.BAD_PARAM_VALUE)
        out[key] = value if eq else None
    return out


class Session:
    """One SMTP connection. Call start() once, then feed it bytes; act on the events returned."""

    def __init__(self, config: SessionConfig, peer: Peer, *, tls: bool = False) -> None:
        self.config = config
        self.peer = peer
        self.tls = tls
        self.auth_user: str | None = None
        self.helo = ""
        self.errors = 0
        self._esmtp = False
        self._state = State.CONNECTED
        self._buf = bytearray()
        self._scan = 0  # self._buf holds no LF before this offset
        self._discarding = False  # inside an overlong command line
        self._overflow = False  # too much input arrived while waiting
        self._out: list[Event] = []
        # SASL exchange
        self._auth_mech = ""
        self._auth_step: list[str] = []
        self._auth_pending: str | None = None
        # the mail transaction (RFC 5321 §3.3), cleared by _reset_transaction
        self._sender: str | None = None
        self._recipients: list[Recipient] = []
        self._body_8bit = False
        self._smtputf8 = False
        self._ret: str | None = None
        self._envid: str | None = None
        self._data = bytearray()
        self._prev_crlf = True  # the previous line (or the DATA command) ended in CRLF
        self._in_long_line = False  # discarding the rest of an overlong text line
        self._too_big = self._too_long = self._bare = self._nul = False
        self._reset_transaction()

    # -- public API --------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def waiting(self) -> bool:
        """A Transaction, StartTLS or Authenticate is outstanding: input is buffered, not processed
        (after StartTLS it is discarded)."""
        return self._state in _WAITING

    @property
    def in_transaction(self) -> bool:
        """MAIL given and the transaction not yet finished (for graceful shutdown)."""
        return self._state in _IN_TRANSACTION

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def buffered(self) -> int:
        """Octets of input held, not yet processed (bounded; see the MAX_* constants)."""
        return len(self._buf) + len(self._data)

    @property
    def protocol(self) -> str:
        """RFC 3848 (and RFC 6531 §3.7.3 for SMTPUTF8) "with" keyword for the Received header."""
        if not self._esmtp:
            return "SMTP"
        name = "UTF8SMTP" if self._smtputf8 else "ESMTP"
        return name + ("S" if self.tls else "") + ("A" if self.auth_user is not None else "")

    def start(self) -> list[Event]:
        self._send(replies.greeting(self.config.hostname), counts=False)
        return self._take()

    def receive_data(self, data: bytes) -> list[Event]:
        if self.closed or self._state is State.WAIT_TLS or not data:
            # After StartTLS, anything that arrives before the handshake is plaintext injection
            # (CVE-2011-0411) and is dropped.
            return self._take()
        if self.waiting:
            room = MAX_BUFFER_WHILE_WAITING - len(self._buf)
            if len(data) > room:
                self._overflow = True
                data = data[: max(room, 0)]
            self._buf += data
            return []
        self._buf += data
        self._process()
        return self._take()

    def eof(self) -> list[Event]:
        if self.closed:
            return []
        self._state = State.CLOSED
        self._buf.clear()
        return [Close(reply_sent=False)]

    def message_stored(self, queue_id: str) -> list[Event]:
        return self._end_wait(State.WAIT_STORE, replies.queued(queue_id))

    def message_failed(self, reply: Reply) -> list[Event]:
        return self._end_wait(State.WAIT_STORE, reply)

    def tls_started(self) -> list[Event]:
        """RFC 3207 §4.2: forget everything learnt before TLS; the client must EHLO again."""
        if self._state is not State.WAIT_TLS:
            return []
        self.tls = True
        self.helo = ""
        self._esmtp = False
        self.auth_user = None
        self._buf.clear()
        self._scan = 0
        self._discarding = False
        self._overflow = False
        self._reset_transaction()
        self._state = State.CONNECTED
        return []

    def auth_result(self, ok: bool, failure: Reply | None = None) -> list[Event]:
        """The verdict on an Authenticate. ``failure`` replaces ``535 5.7.8`` when the credentials
        were not checked at all (rate limited, or a temporary failure: ``454 4.7.0``)."""
        if self._state is not State.WAIT_AUTH:
            return []
        if ok:
            self.auth_user = self._auth_pending
            reply = replies.AUTH_OK
        else:
            reply = failure or replies.AUTH_FAILED
        self._auth_pending = None
        return self._end_wait(State.WAIT_AUTH, reply, counts=not ok)

    def timeout(self) -> list[Event]:
        return self._close_with(replies.TIMEOUT)

    def shutdown(self) -> list[Event]:
        return self._close_with(replies.SHUTTING_DOWN)

    # -- output ------------------------------------------------------------------------------------
    def _send(self, reply: Reply, *, counts: bool | None = None) -> None:
        """Queue a reply. Replies >= 400 count as client errors unless ``counts=False``."""
        self._out.append(Send(reply.to_bytes()))
        if counts is None:
            counts = reply.code >= 400
        if counts:
            self.errors += 1
            if self.errors >= self.config.max_errors:
                self._out.append(Send(replies.TOO_MANY_ERRORS.to_bytes()))
                self._close()

    def _close(self) -> None:
        self._out.append(Close(reply_sent=True))
        self._state = State.CLOSED
        self._buf.clear()

    def _close_with(self, reply: Reply) -> list[Event]:
        if self.closed:
            return []
        self._send(reply, counts=False)
        self._close()
        return self._take()

    def _take(self) -> list[Event]:
        """The queued events, consecutive Sends joined into one write."""
        out: list[Event] = []
        for event in self._out:
            if isinstance(event, Send) and out and isinstance(out[-1], Send):
                out[-1] = Send(out[-1].data + event.data)
            else:
                out.append(event)
        self._out = []
        return out

    def _end_wait(self, expected: State, reply: Reply, *, counts: bool = False) -> list[Event]:
        if self._state is not expected:
            return []
        if expected is State.WAIT_STORE:
            self._reset_transaction()
        self._state = State.READY
        self._send(reply, counts=counts)
        if self._overflow and not self.closed:
            self._send(PIPELINE_OVERFLOW, counts=False)
            self._close()
        if not self.closed:
            self._process()
        return self._take()

    # -- input -------------------------------------------------------------------------------------
    def _process(self) -> None:
        while not self.closed and not self.waiting:
            if self._state is State.DATA:
                if not self._data_line():
                    return
            else:
                line = self._command_line()
                if line is None:
                    return
                self._handle(line)

    def _next_line(self) -> bytes | None:
        idx = self._buf.find(b"\n", self._scan)
        if idx < 0:
            self._scan = len(self._buf)
            return None
        line = bytes(self._buf[: idx + 1])
        del self._buf[: idx + 1]
        self._scan = 0
        return line

    def _command_line(self) -> bytes | None:
        """The next complete command line without its terminator (CRLF or bare LF), or None."""
        while True:
            line = self._next_line()
            if line is None:
                if len(self._buf) > MAX_BUFFERED_LINE:
                    self._discarding = True  # answered once its LF arrives; memory stays bounded
                    self._buf.clear()
                    self._scan = 0
                return None
            if not self._discarding:
                return line[:-2] if line.endswith(b"\r\n") else line[:-1]
            self._discarding = False
            if self._state is State.AUTH_INPUT:
                self._state = State.READY
            self._send(replies.LINE_TOO_LONG)
            if self.closed:
                return None

    def _handle(self, line: bytes) -> None:
        if self._state is State.AUTH_INPUT:
            self._auth_response(line)
            return
        limit = _LINE_LIMIT.get(line[:4].upper(), MAX_COMMAND_LINE)
        if len(line) + 2 > limit:
            self._send(replies.LINE_TOO_LONG)
            return
        if b"\0" in line or b"\r" in line:
            self._send(replies.INVALID_CHARACTER)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._send(replies.INVALID_CHARACTER)
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb not in KNOWN_VERBS:
            self._send(replies.UNRECOGNIZED)
            return
        if not text.isascii() and verb not in ("MAIL", "RCPT"):
            self._send(replies.INVALID_CHARACTER)
            return
        target = TRANSITIONS.get(self._state, {}).get(verb)
        if target is None:
            self._send(replies.BAD_SEQUENCE)
            return
        handler: Callable[[str, State], State | None] = getattr(self, f"_cmd_{verb.lower()}")
        try:
            new_state = handler(arg.strip(" "), target)
        except _ArgError as exc:
            self._send(exc.reply)
            return
        if new_state is not None and not self.closed:
            self._state = new_state

    # -- commands: each returns the new state, or None to stay ---------------------------------------
    def _cmd_ehlo(self, arg: str, target: State) -> State | None:
        if not arg:
            raise _ArgError(replies.SYNTAX_ERROR_ARGS)
        self.helo = arg
        self._esmtp = True
        self._reset_transaction()
        keywords = ["PIPELINING", f"SIZE {self.config.max_message_size}"]
        if self.config.tls_available and not self.tls:
            keywords.append("STARTTLS")
        if self.config.auth_available and self.tls:
            keywords.append("AUTH PLAIN LOGIN")
        keywords += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"]
        self._send(replies.ehlo_reply(self.config.hostname, keywords))
        return target

    def _cmd_helo(self, arg: str, target: State) -> State | None:
        if not arg:
            raise _ArgError(replies.SYNTAX_ERROR_ARGS)
        self.helo = arg
        self._esmtp = False
        self._reset_transaction()
        self._send(replies.helo_reply(self.config.hostname))
        return target

    def _cmd_noop(self, arg: str, target: State) -> State | None:
        self._send(replies.OK)
        return target

    def _cmd_rset(self, arg: str, target: State) -> State | None:
        if arg:
            raise _ArgError(replies.SYNTAX_ERROR_ARGS)
        self._reset_transaction()
        self._send(replies.RESET_OK)
        return target

    def _cmd_quit(self, arg: str, target: State) -> State | None:
        self._send(replies.BYE)
        self._close()
        return target

    def _cmd_vrfy(self, arg: str, target: State) -> State | None:
        if not arg:
            raise _ArgError(replies.SYNTAX_ERROR_ARGS)
        self._send(replies.VRFY_CANNOT)
        return target

    def _cmd_expn(self, arg: str, target: State) -> State | None:
        self._send(replies.EXPN_DISABLED)
        return None

    def _cmd_help(self, arg: str, target: State) -> State | None:
        self._send(replies.HELP)
        return target

    def _cmd_starttls(self, arg: str, target: State) -> State | None:
        if arg:
            raise _ArgError(replies.SYNTAX_ERROR_ARGS)
        if self.tls:
            raise _ArgError(replies.TLS_ALREADY_ACTIVE)
        if not self.config.tls_available:
            raise _ArgError(replies.TLS_NOT_AVAILABLE)
        self._send(replies.STARTTLS_READY)
        self._out.append(StartTLS())
        # Anything pipelined after STARTTLS was sent in clear text: never act on it (CVE-2011-0411).
        self._buf.clear()
        self._scan = 0
        return target

    def _cmd_mail(self, arg: str, target: State) -> State | None:
        if self.config.tls_required and not self.tls:
            raise _ArgError(replies.MUST_STARTTLS)
        path, items = _split_path(arg, "FROM:")
        params = _params(items)
        size = body = ret = envid = None
        smtputf8 = False
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isascii() or not value.isdigit() or len(value) > 20:
                    raise _ArgError(replies.BAD_PARAM_VALUE)
                size = int(value)
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise _ArgError(replies.BAD_PARAM_VALUE)
                body = value.upper()
            elif key == "SMTPUTF8":
                if value is not None:
                    raise _ArgError(replies.BAD_PARAM_VALUE)
                smtputf8 = True
            elif key == "RET":
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    raise _ArgError(replies.BAD_PARAM_VALUE)
                ret = value.upper()
            elif key == "ENVID":
                if value is None or len(value) > MAX_ENVID:
                    raise _ArgError(replies.BAD_PARAM_VALUE)
                try:
                    envid = xtext_decode(value)
                except ValueError:
                    raise _ArgError(replies.BAD_PARAM_VALUE) from None
            elif key == "AUTH":
                if value is None:
                    raise _ArgError(replies.BAD_PARAM_VALUE)
                # RFC 4954 §5: we do not trust other hosts' AUTH= assertions; accepted and ignored.
            else:
                raise _ArgError(replies.PARAM_NOT_RECOGNIZED)
        if size is not None and size > self.config.max_message_size:
            raise _ArgError(replies.MESSAGE_TOO_BIG)
        try:
            sender = policy.parse_reverse_path(path, smtputf8=smtputf8)
        except policy.PathError as exc:
            raise _ArgError(exc.reply) from None
        gate = self.config.mail_gate()
        if gate is not None:
            self._send(gate, counts=False)
            return None
        self._reset_transaction()
        self._sender = sender
        self._body_8bit = body == "8BITMIME"
        self._smtputf8 = smtputf8
        self._ret = ret
        self._envid = envid
        self._send(replies.SENDER_OK)
        return target

    def _cmd_rcpt(self, arg: str, target: State) -> State | None:
        path, items = _split_path(arg, "TO:")
        notify: tuple[str, ...] = ()
        orcpt: str | None = None
        for key, value in _params(items).items():
            if key == "NOTIFY":
                kinds = (value or "").upper().split(",")
                valid = kinds == ["NEVER"] or (
                    set(kinds) <= {"SUCCESS", "FAILURE", "DELAY"} and len(set(kinds)) == len(kinds)
                )
                if value is None or not valid:
                    raise _ArgError(replies.BAD_PARAM_VALUE)
                notify = tuple(kinds)
            elif key == "ORCPT":
                addr_type, semi, xtext = (value or "").partition(";")
                if (
                    value is None
                    or len(value) > MAX_ORCPT
                    or not semi
                    or not addr_type
                    or not all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in addr_type)
                    or not xtext
                ):
                    raise _ArgError(replies.BAD_PARAM_VALUE)
                try:
                    orcpt = f"{addr_type};{xtext_decode(xtext)}"
                except ValueError:
                    raise _ArgError(replies.BAD_PARAM_VALUE) from None
            else:
                raise _ArgError(replies.PARAM_NOT_RECOGNIZED)
        try:
            address = policy.parse_forward_path(path, smtputf8=self._smtputf8)
        except policy.PathError as exc:
            raise _ArgError(exc.reply) from None
        if len(self._recipients) >= self.config.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 and the client retries the rest later; not the client's error.
            self._send(replies.TOO_MANY_RECIPIENTS, counts=False)
            return None
        denied = policy.relay_check(
            self.peer.ip, self.auth_user, address, self.config.networks, self.config.relay_domains
        )
        if denied is not None:
            raise _ArgError(denied)
        self._recipients.append(Recipient(address=address, notify=notify, orcpt=orcpt))
        self._send(replies.RECIPIENT_OK)
        return target

    def _cmd_data(self, arg: str, target: State) -> State | None:
        if arg:
            raise _ArgError(replies.SYNTAX_ERROR_ARGS)
        self._send(replies.DATA_START)
        self._data = bytearray()
        self._prev_crlf = True  # the DATA command's own line end
        self._in_long_line = False
        self._too_big = self._too_long = self._bare = self._nul = False
        return target

    def _cmd_auth(self, arg: str, target: State) -> State | None:
        if not self._esmtp:
            raise _ArgError(replies.BAD_SEQUENCE)  # RFC 4954 §4: AUTH follows EHLO
        if not self.config.auth_available:
            raise _ArgError(replies.AUTH_NOT_AVAILABLE)
        if not self.tls:
            raise _ArgError(replies.ENCRYPTION_REQUIRED_FOR_AUTH)
        if self.auth_user is not None:
            raise _ArgError(replies.AUTH_ALREADY)  # RFC 4954 §4: only one successful AUTH
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        initial = initial.strip(" ")
        if not mech:
            raise _ArgError(replies.SYNTAX_ERROR_ARGS)
        if mech not in ("PLAIN", "LOGIN"):
            raise _ArgError(replies.AUTH_MECHANISM_UNKNOWN)
        self._auth_mech = mech
        self._auth_step = []
        if not initial:
            self._send(replies.AUTH_CONTINUE if mech == "PLAIN" else replies.LOGIN_USERNAME)
            return State.AUTH_INPUT
        if initial == "*":
            raise _ArgError(replies.AUTH_CANCELLED)
        return self._auth_feed(initial.encode("ascii", "replace"), target)

    def _auth_response(self, line: bytes) -> None:
        """A SASL response line in state AUTH_INPUT."""
        if len(line) + 2 > MAX_AUTH_LINE:
            self._state = State.READY
            self._send(replies.LINE_TOO_LONG)
            return
        line = line.strip(b" ")
        if line == b"*":
            self._state = State.READY
            self._send(replies.AUTH_CANCELLED)
            return
        new_state = self._auth_feed(line, State.WAIT_AUTH)
        if not self.closed:
            self._state = State.READY if new_state is None else new_state

    def _auth_feed(self, b64: bytes, target: State) -> State | None:
        """One base64 response; returns AUTH_INPUT (ask for more), ``target`` (Authenticate issued)
        or None (answered with an error)."""
        try:
            # RFC 4954 §4: "=" is an empty initial response.
            raw = b"" if b64 == b"=" else base64.b64decode(b64, validate=True)
            text = raw.decode("utf-8")
        except (binascii.Error, ValueError):
            self._send(replies.AUTH_BAD_BASE64)
            return None
        if self._auth_mech == "PLAIN":
            parts = text.split("\0")  # RFC 4616 §2: [authzid] NUL authcid NUL passwd
            if len(parts) != 3 or not parts[1]:
                self._send(replies.AUTH_BAD_BASE64)
                return None
            return self._authenticate(parts[0], parts[1], parts[2], target)
        self._auth_step.append(text)
        if len(self._auth_step) == 1:
            self._send(replies.LOGIN_PASSWORD)
            return State.AUTH_INPUT
        return self._authenticate("", self._auth_step[0], self._auth_step[1], target)

    def _authenticate(self, authzid: str, username: str, password: str, target: State) -> State:
        self._auth_pending = username
        self._auth_step = []
        self._out.append(Authenticate(self._auth_mech, authzid, username, password))
        return target

    # -- DATA --------------------------------------------------------------------------------------
    def _data_line(self) -> bool:
        """Consume one line of the message; False when no complete line is buffered."""
        line = self._next_line()
        if line is None:
            if len(self._buf) > MAX_TEXT_LINE:
                # No LF in over 1000 octets: the line is too long whatever follows. Drop what we
                # hold but its last octet (a CR whose LF may come next).
                self._too_long = self._in_long_line = True
                self._drop_data()
                del self._buf[:-1]
                self._scan = len(self._buf)
            return False
        crlf = line.endswith(b"\r\n")
        if self._in_long_line:
            self._in_long_line = False
            self._prev_crlf = crlf
            return True
        if crlf and self._prev_crlf and line == b".\r\n":
            self._end_data()
            return True
        content = line[:-2] if crlf else line[:-1]
        self._prev_crlf = crlf
        if not crlf or b"\r" in content:
            self._bare = True
        if b"\0" in content:
            self._nul = True
        if content.startswith(b"."):
            content = content[1:]  # RFC 5321 §4.5.2 transparency
        if len(content) + 2 > MAX_TEXT_LINE:
            self._too_long = True
        if len(self._data) + len(content) + 2 > self.config.max_message_size:
            self._too_big = True
        if self._too_big or self._too_long or self._bare or self._nul:
            self._drop_data()  # rejected anyway: read on to the dot, keep nothing
        else:
            self._data += content
            self._data += b"\r\n"
        return True

    def _drop_data(self) -> None:
        if self._data:
            self._data = bytearray()

    def _end_data(self) -> None:
        reject = (
            replies.MESSAGE_TOO_BIG
            if self._too_big
            else replies.LINE_TOO_LONG
            if self._too_long
            else replies.BARE_NEWLINE
            if self._bare
            else replies.NUL_IN_MESSAGE
            if self._nul
            else None
        )
        self._state = State.READY
        if reject is not None:
            self._reset_transaction()
            self._send(reject)
            return
        gate = self.config.mail_gate()
        if gate is not None:
            self._reset_transaction()
            self._send(gate, counts=False)
            return
        self._out.append(
            Transaction(
                sender=self._sender or "",
                recipients=tuple(self._recipients),
                data=bytes(self._data),
                helo=self.helo,
                protocol=self.protocol,
                body_8bit=self._body_8bit,
                smtputf8=self._smtputf8,
                ret=self._ret,
                envid=self._envid,
                auth_user=self.auth_user,
            )
        )
        self._data = bytearray()
        self._state = State.WAIT_STORE

    def _reset_transaction(self) -> None:
        self._sender = None
        self._recipients = []
        self._body_8bit = False
        self._smtputf8 = False
        self._ret = None
        self._envid = None
        self._data = bytearray()
        self._prev_crlf = True
        self._in_long_line = False
        self._too_big = self._too_long = self._bare = self._nul = False
