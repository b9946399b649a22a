"""The SMTP server session as a pure, sans-IO state machine (in the manner of h11).

Bytes go in (``receive_data``), events come out (``Send``, ``Transaction``, ``StartTLS``,
``Authenticate``, ``Close``). No sockets, no asyncio, no Redis: the caller owns all IO and reports
back with ``message_stored``/``message_failed``, ``tls_started`` and ``auth_result``.

What is allowed when lives in the state table (ingress/states.py): ``TRANSITIONS`` for verbs (a verb
missing from the current state's row is answered ``503 5.5.1``), ``EVENTS`` for the rest; the state
changes only in ``_transition``. Handlers only validate arguments: on failure the state does not
change, on success the handler names what moves it (its verb, or an ``Input``). The other concerns
live beside this module: events.py (what the caller gets), readers.py (line framing and the DATA
reader), params.py (MAIL/RCPT parameters), sasl.py (the AUTH exchange), limits.py.

Choices where the RFCs leave room (following Postfix):
- Lines end at LF in the command phase (a bare LF is tolerated), but only CRLF.CRLF ends DATA
  (readers.py: no SMTP smuggling sequence can end a message or start a command).
- 8-bit octets in DATA without BODY=8BITMIME are accepted, as Postfix does (RFC 6152 leaves the
  server free; refusing them only hurts legitimate but sloppy clients).
- DATA before any accepted RCPT is ``503 5.5.1`` (a miss in the table).
- Paths without angle brackets are accepted (Postfix ``strict_rfc821_envelopes = no``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from common.envelope import Recipient
from ingress import policy, replies
from ingress.config import SessionConfig
from ingress.events import Authenticate, AwaitFlow, Close, Event, Peer, Send, StartTLS, Transaction, VerifyRecipient
from ingress.limits import MAX_AUTH_LINE, MAX_BUFFER_WHILE_WAITING, line_limit
from ingress.notes import Note, printable, reject_line
from ingress.params import ArgError, parse_mail_params, parse_rcpt_params, split_path
from ingress.readers import OVERLONG, DataReader, DataStep, LineReader
from ingress.replies import Reply
from ingress.sasl import MECHANISMS, Answer, Challenge, Refused, Sasl, Step
from ingress.states import IN_TRANSACTION, KNOWN_VERBS, TRANSITIONS, WAITING, Input, State, allows, next_state

__all__ = [
    "KNOWN_VERBS",
    "PIPELINE_OVERFLOW",
    "TRANSITIONS",
    "Authenticate",
    "AwaitFlow",
    "Close",
    "Event",
    "Peer",
    "Send",
    "Session",
    "SessionConfig",
    "StartTLS",
    "State",
    "Transaction",
]

PIPELINE_OVERFLOW = Reply(421, "4.7.0", "Error: too much pipelined input")


@dataclass(slots=True)
class _Transaction:
    """The mail transaction (RFC 5321 §3.3) between MAIL and the end of DATA (or RSET, EHLO...)."""

    sender: str | None = None
    recipients: list[Recipient] = field(default_factory=list)
    body_8bit: bool = False
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    requiretls: bool = False  # RFC 8689 MAIL FROM REQUIRETLS
    data: DataReader | None = None  # from the 354 on


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
        self._lines = LineReader()
        self._overflow = False  # too much input arrived while waiting
        self._out: list[Event] = []
        self._sasl: Sasl | None = None
        self._auth_pending: str | None = None  # the user name being checked
        self._verifying: Recipient | None = None  # the recipient a VerifyRecipient asks about
        self._tx = _Transaction()
        # for the log: the command being answered, and the paths it named
        self._notes: list[Note] = []
        self._command = "CONNECT"
        self._cmd_from: str | None = None
        self._cmd_to: str | None = None

    # -- public API --------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def waiting(self) -> bool:
        """A Transaction, StartTLS or Authenticate is outstanding: input is buffered, not processed
        (after StartTLS it is discarded)."""
        return self._state in WAITING

    @property
    def in_transaction(self) -> bool:
        """MAIL given and the transaction not yet finished (for graceful shutdown)."""
        return self._state in IN_TRANSACTION

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def buffered(self) -> int:
        """Octets of input held, not yet processed (bounded; see ingress/limits.py)."""
        return len(self._lines) + (len(self._tx.data) if self._tx.data is not None else 0)

    @property
    def protocol(self) -> str:
        """RFC 3848 (and RFC 6531 §3.7.3 for SMTPUTF8) "with" keyword for the Received header."""
        if not self._esmtp:
            return "SMTP"
        name = "UTF8SMTP" if self._tx.smtputf8 else "ESMTP"
        return name + ("S" if self.tls else "") + ("A" if self.auth_user is not None else "")

    def take_notes(self) -> list[Note]:
        """Lines for the log written since the last call (refusals, dropped parameters)."""
        notes, self._notes = self._notes, []
        return notes

    def start(self) -> list[Event]:
        self._send(replies.greeting(self.config.hostname), counts=False)
        return self._take()

    def receive_data(self, data: bytes) -> list[Event]:
        if self.closed or self._state is State.WAIT_TLS or not data:
            # After StartTLS, anything that arrives before the handshake is plaintext injection
            # (CVE-2011-0411) and is dropped.
            return self._take()
        if self.waiting:
            room = MAX_BUFFER_WHILE_WAITING - len(self._lines)
            if len(data) > room:
                self._overflow = True
                data = data[: max(room, 0)]
            self._lines.feed(data)
            return []
        self._lines.feed(data)
        self._process()
        return self._take()

    def eof(self) -> list[Event]:
        if self.closed:
            return []
        self._transition(Input.EOF)
        self._lines.clear()
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
        self._lines.clear()
        self._overflow = False
        self._reset_transaction()
        self._transition(Input.TLS_STARTED)
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

    def recipient_verified(self, refusal: Reply | None) -> list[Event]:
        """The verdict on a VerifyRecipient: None accepts the recipient, a reply refuses it."""
        if self._state is not State.WAIT_VERIFY or self._verifying is None:
            return []
        rcpt, self._verifying = self._verifying, None
        self._command, self._cmd_from, self._cmd_to = "RCPT", self._tx.sender, rcpt.address
        if refusal is None:
            self._tx.recipients.append(rcpt)
        trigger = Input.RCPT_VERIFIED if self._tx.recipients else Input.RCPT_UNVERIFIED
        return self._end_wait(
            State.WAIT_VERIFY, refusal or replies.RECIPIENT_OK, counts=refusal is not None, trigger=trigger
        )

    def flow_granted(self) -> list[Event]:
        """The end of an AwaitFlow (delivery caught up, or in_flow_delay passed): the MAIL's 250."""
        self._command, self._cmd_from, self._cmd_to = "MAIL", self._tx.sender, None
        return self._end_wait(State.WAIT_FLOW, replies.SENDER_OK, trigger=Input.FLOW_GRANTED)

    def timeout(self) -> list[Event]:
        return self._close_with(replies.TIMEOUT)

    def shutdown(self) -> list[Event]:
        return self._close_with(replies.SHUTTING_DOWN)

    # -- the one writer of the state ---------------------------------------------------------------
    def _transition(self, trigger: str | Input) -> None:
        """Move as the state table says for ``trigger`` (a verb or an Input); a move it does not
        list raises IllegalTransition (a bug here, never the client's doing)."""
        self._state = next_state(self._state, trigger)

    # -- output ------------------------------------------------------------------------------------
    def _send(self, reply: Reply, *, counts: bool | None = None, note: bool = True) -> None:
        """Queue a reply. Replies >= 400 count as client errors unless ``counts=False``, and are
        noted for the log unless ``note=False`` (the caller logs those itself)."""
        self._out.append(Send(reply.to_bytes()))
        if note and reply.code >= 400:
            self._note_reject(reply)
        if counts is None:
            counts = reply.code >= 400
        if counts:
            self.errors += 1
            if self.errors >= self.config.max_errors:
                self._out.append(Send(replies.TOO_MANY_ERRORS.to_bytes()))
                self._note(logging.WARNING, f"too many errors after {self._command} from {self._client}")
                self._close()

    @property
    def _client(self) -> str:
        return f"{printable(self.peer.name)}[{self.peer.ip}]"

    def _note(self, level: int, text: str) -> None:
        self._notes.append(Note(level, text))

    def _note_reject(self, reply: Reply) -> None:
        line = reject_line(
            self._command,
            self.peer,
            reply,
            sender=self._cmd_from,
            recipient=self._cmd_to,
            helo=self.helo,
            protocol="ESMTP" if self._esmtp else "SMTP",
        )
        self._note(logging.INFO, line)

    def _close(self) -> None:
        self._out.append(Close(reply_sent=True))
        self._transition(Input.CLOSE)
        self._lines.clear()

    def _close_with(self, reply: Reply) -> list[Event]:
        if self.closed:
            return []
        self._send(reply, counts=False, note=False)  # the caller logs why (timeout, shutdown)
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

    def _end_wait(
        self, expected: State, reply: Reply, *, counts: bool = False, trigger: Input | None = None
    ) -> list[Event]:
        if self._state is not expected:
            return []
        if expected is State.WAIT_STORE:
            self._reset_transaction()
            self._transition(Input.STORE_DONE)
        elif expected is State.WAIT_AUTH:
            self._transition(Input.AUTH_VERDICT)
        else:
            assert trigger is not None
            self._transition(trigger)
        # storage and AUTH verdicts: the server logs them; a refused verification is noted here
        self._send(reply, counts=counts, note=expected is State.WAIT_VERIFY)
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
                assert self._tx.data is not None
                step = self._tx.data.step(self._lines)
                if step is DataStep.MORE:
                    return
                if step is DataStep.END:
                    self._end_data(self._tx.data)
                continue
            line = self._lines.command_line()
            if line is None:
                return
            if line is OVERLONG:
                self._command, self._cmd_from, self._cmd_to = "UNKNOWN", self._tx.sender, None
                if self._state is State.AUTH_INPUT:
                    self._transition(Input.AUTH_ABORT)
                self._send(replies.LINE_TOO_LONG)
                continue
            self._handle(line)

    def _handle(self, line: bytes) -> None:
        guess = line[:8].split(b" ", 1)[0].upper().decode("ascii", "replace")
        self._command = "AUTH" if self._state is State.AUTH_INPUT else guess if guess in KNOWN_VERBS else "UNKNOWN"
        self._cmd_from, self._cmd_to = self._tx.sender, None
        if self._state is State.AUTH_INPUT:
            self._auth_response(line)
            return
        if len(line) + 2 > line_limit(line):
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
        if not allows(self._state, verb):
            self._send(replies.BAD_SEQUENCE)
            return
        handler: Callable[[str], str | Input | None] = getattr(self, f"_cmd_{verb.lower()}")
        try:
            trigger = handler(arg.strip(" "))
        except ArgError as exc:
            self._send(exc.reply)
            return
        if trigger is not None and not self.closed:
            self._transition(trigger)

    # -- commands: each returns what moves the state (its verb, or an Input), or None to stay --------
    def _cmd_ehlo(self, arg: str) -> str | Input | None:
        if not arg:
            raise ArgError(replies.SYNTAX_ERROR_ARGS)
        self.helo = arg
        self._esmtp = True
        self._reset_transaction()
        keywords = ["PIPELINING", f"SIZE {self.config.max_message_size}"]
        if self.config.tls_available and not self.tls:
            keywords.append("STARTTLS")
        if self.config.auth_available and self.tls:
            keywords.append("AUTH " + " ".join(MECHANISMS))
        keywords += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"]
        if self.tls:
            keywords.append("REQUIRETLS")  # RFC 8689 §4.1: only over TLS
        self._send(replies.ehlo_reply(self.config.hostname, keywords))
        return "EHLO"

    def _cmd_helo(self, arg: str) -> str | Input | None:
        if not arg:
            raise ArgError(replies.SYNTAX_ERROR_ARGS)
        self.helo = arg
        self._esmtp = False
        self._reset_transaction()
        self._send(replies.helo_reply(self.config.hostname))
        return "HELO"

    def _cmd_noop(self, arg: str) -> str | Input | None:
        self._send(replies.OK)
        return "NOOP"

    def _cmd_rset(self, arg: str) -> str | Input | None:
        if arg:
            raise ArgError(replies.SYNTAX_ERROR_ARGS)
        self._reset_transaction()
        self._send(replies.RESET_OK)
        return "RSET"

    def _cmd_quit(self, arg: str) -> str | Input | None:
        self._send(replies.BYE)
        self._close()
        return None

    def _cmd_vrfy(self, arg: str) -> str | Input | None:
        if not arg:
            raise ArgError(replies.SYNTAX_ERROR_ARGS)
        self._send(replies.VRFY_CANNOT)
        return "VRFY"

    def _cmd_expn(self, arg: str) -> str | Input | None:
        self._send(replies.EXPN_DISABLED)
        return None

    def _cmd_help(self, arg: str) -> str | Input | None:
        self._send(replies.HELP)
        return "HELP"

    def _cmd_starttls(self, arg: str) -> str | Input | None:
        if arg:
            raise ArgError(replies.SYNTAX_ERROR_ARGS)
        if self.tls:
            raise ArgError(replies.TLS_ALREADY_ACTIVE)
        if not self.config.tls_available:
            raise ArgError(replies.TLS_NOT_AVAILABLE)
        self._send(replies.STARTTLS_READY)
        self._out.append(StartTLS())
        # Anything pipelined after STARTTLS was sent in clear text: never act on it (CVE-2011-0411).
        self._lines.clear()
        return "STARTTLS"

    def _cmd_mail(self, arg: str) -> str | Input | None:
        if self.config.tls_required and not self.tls:
            raise ArgError(replies.MUST_STARTTLS)
        path, items = split_path(arg, "FROM:")
        params = parse_mail_params(items)
        if params.size is not None and params.size > self.config.max_message_size:
            raise ArgError(replies.MESSAGE_TOO_BIG)
        if params.requiretls and not self.tls:
            raise ArgError(replies.REQUIRETLS_NEEDS_TLS)
        try:
            sender = policy.parse_reverse_path(path, smtputf8=params.smtputf8)
        except policy.PathError as exc:
            raise ArgError(exc.reply) from None
        self._cmd_from = sender
        gate = self.config.mail_gate()
        if gate is not None:
            self._send(gate, counts=False)
            return None
        self._tx = _Transaction(
            sender=sender,
            body_8bit=params.body_8bit,
            smtputf8=params.smtputf8,
            ret=params.ret,
            envid=params.envid,
            requiretls=params.requiretls,
        )
        if self.config.mail_flow():
            # delivery lags: the 250 waits for it (Postfix's in_flow_delay, also at MAIL)
            self._out.append(AwaitFlow())
            return Input.FLOW_ASKED
        self._send(replies.SENDER_OK)
        return "MAIL"

    def _cmd_rcpt(self, arg: str) -> str | Input | None:
        path, items = split_path(arg, "TO:")
        params = parse_rcpt_params(items, smtputf8=self._tx.smtputf8)
        try:
            address = policy.parse_forward_path(path, smtputf8=self._tx.smtputf8)
        except policy.PathError as exc:
            raise ArgError(exc.reply) from None
        self._cmd_to = address
        if len(self._tx.recipients) >= self.config.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 and the client retries the rest later; not the client's error.
            self._send(replies.TOO_MANY_RECIPIENTS, counts=False)
            return None
        denied = policy.relay_check(
            self.peer.ip, self.auth_user, address, self.config.networks, self.config.relay_domains
        )
        if denied is not None:
            raise ArgError(denied)
        suppressed = self.config.suppressed(self._tx.sender or "", address)  # a hard bounce before (issue 19)
        if suppressed is not None:
            raise ArgError(suppressed)
        if policy.in_relay_domains(address, self.config.relay_domains):
            unlisted = self.config.recipient_check(address)  # relay_recipients, for every client
            if unlisted is not None:
                raise ArgError(unlisted)
        if params.orcpt_dropped is not None:
            # keep the recipient: a lost Original-Recipient costs less than a refused message
            self._note(
                logging.WARNING,
                f"{self._client}: ORCPT of <{printable(address)}> dropped: {params.orcpt_dropped}",
            )
        rcpt = Recipient(address=address, notify=params.notify, orcpt=params.orcpt)
        if (
            self.config.verify_recipients
            and policy.in_relay_domains(address, self.config.relay_domains)
            and not policy.is_trusted(self.peer.ip, self.auth_user, self.config.networks)
        ):
            self._verifying = rcpt
            self._out.append(VerifyRecipient(address))
            return Input.VERIFY_ASKED
        self._tx.recipients.append(rcpt)
        self._send(replies.RECIPIENT_OK)
        return "RCPT"

    def _cmd_data(self, arg: str) -> str | Input | None:
        if arg:
            raise ArgError(replies.SYNTAX_ERROR_ARGS)
        self._send(replies.DATA_START)
        self._tx.data = DataReader(self.config.max_message_size)
        return "DATA"

    def _cmd_auth(self, arg: str) -> str | Input | None:
        if not self._esmtp:
            raise ArgError(replies.BAD_SEQUENCE)  # RFC 4954 §4: AUTH follows EHLO
        if not self.config.auth_available:
            raise ArgError(replies.AUTH_NOT_AVAILABLE)
        if not self.tls:
            raise ArgError(replies.ENCRYPTION_REQUIRED_FOR_AUTH)
        if self.auth_user is not None:
            raise ArgError(replies.AUTH_ALREADY)  # RFC 4954 §4: only one successful AUTH
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if not mech:
            raise ArgError(replies.SYNTAX_ERROR_ARGS)
        if mech not in MECHANISMS:
            raise ArgError(replies.AUTH_MECHANISM_UNKNOWN)
        self._sasl = Sasl(mech)
        return self._sasl_step(self._sasl.start(initial.strip(" ")), done="AUTH")

    def _auth_response(self, line: bytes) -> None:
        """A SASL response line in state AUTH_INPUT."""
        if len(line) + 2 > MAX_AUTH_LINE:
            self._transition(Input.AUTH_ABORT)
            self._send(replies.LINE_TOO_LONG)
            return
        line = line.strip(b" ")
        assert self._sasl is not None
        step = Refused(replies.AUTH_CANCELLED) if line == b"*" else self._sasl.respond(line)
        if isinstance(step, Refused):
            self._transition(Input.AUTH_ABORT)
            self._send(step.reply)
            return
        trigger = self._sasl_step(step, done=Input.AUTH_ANSWER)
        if trigger is not None and not self.closed:
            self._transition(trigger)

    def _sasl_step(self, step: Step, *, done: str | Input) -> str | Input | None:
        """Carry out one SASL step: ``done`` when credentials go to be checked, AUTH_CHALLENGE to read
        another line, None when the exchange was refused (answered here)."""
        if isinstance(step, Challenge):
            self._send(step.reply)
            return Input.AUTH_CHALLENGE
        if isinstance(step, Answer):
            assert self._sasl is not None
            self._auth_pending = step.username
            self._out.append(Authenticate(self._sasl.mechanism, step.authzid, step.username, step.password))
            self._sasl = None
            return done
        self._send(step.reply)
        return None

    # -- the end of DATA ---------------------------------------------------------------------------
    def _end_data(self, reader: DataReader) -> None:
        refusal = reader.refusal
        gate = None if refusal is not None else self.config.mail_gate()
        self._command, self._cmd_from, self._cmd_to = "END-OF-MESSAGE", self._tx.sender, None
        if refusal is not None or gate is not None:
            self._reset_transaction()
            self._transition(Input.DATA_REFUSED)
            if refusal is not None:
                self._send(refusal)
            else:
                assert gate is not None
                self._send(gate, counts=False)  # a full queue is not the client's error
            return
        tx = self._tx
        self._out.append(
            Transaction(
                sender=tx.sender or "",
                recipients=tuple(tx.recipients),
                data=reader.take(),
                helo=self.helo,
                protocol=self.protocol,
                body_8bit=tx.body_8bit,
                smtputf8=tx.smtputf8,
                ret=tx.ret,
                envid=tx.envid,
                auth_user=self.auth_user,
                requiretls=tx.requiretls,
                trusted=policy.is_trusted(self.peer.ip, self.auth_user, self.config.networks),
            )
        )
        self._transition(Input.DATA_ACCEPTED)

    def _reset_transaction(self) -> None:
        self._tx = _Transaction()
