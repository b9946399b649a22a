"""The session's state table: every state, and what moves it.

Two tables, one per kind of input. ``TRANSITIONS`` says which command verb is allowed in which state
and where it leads (a verb missing from a state's row is answered ``503 5.5.1``); ``EVENTS`` says the
same for what is not a verb: the end of the message data, the verdict of storage, TLS started, a
SASL line, the client's EOF, our own close. ``next_state`` is the only way to read either, and the
session's ``_transition`` the only caller that writes the state: a move the tables do not list is a
bug in the session, raised as ``IllegalTransition``.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "EVENTS",
    "IN_TRANSACTION",
    "KNOWN_VERBS",
    "TRANSITIONS",
    "WAITING",
    "IllegalTransition",
    "Input",
    "State",
    "allows",
    "next_state",
]


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
    WAIT_VERIFY = "wait_verify"  # VerifyRecipient outstanding (a RCPT waits for the next hop's word)
    WAIT_FLOW = "wait_flow"  # AwaitFlow outstanding: a MAIL waits for delivery to catch up (in_flow_delay)
    CLOSED = "closed"


class Input(str, Enum):
    """What moves the session besides a command verb."""

    DATA_ACCEPTED = "data accepted"  # CRLF.CRLF, the message goes to storage
    DATA_REFUSED = "data refused"  # CRLF.CRLF of a message refused (too big, bare LF, NUL, full queue)
    STORE_DONE = "store done"  # the storage's verdict: stored or failed
    TLS_STARTED = "tls started"  # RFC 3207 §4.2: back to the start, EHLO again
    AUTH_CHALLENGE = "auth challenge"  # a 334 went out: read a SASL response line
    AUTH_ANSWER = "auth answer"  # the SASL exchange gave credentials: check them
    AUTH_ABORT = "auth abort"  # "*", an undecodable or overlong SASL line
    AUTH_VERDICT = "auth verdict"  # the credentials were checked (or not, rate limited)
    VERIFY_ASKED = "verify asked"  # a relay recipient goes to be verified at the next hop
    RCPT_VERIFIED = "rcpt verified"  # the verdict, with at least one recipient accepted
    RCPT_UNVERIFIED = "rcpt unverified"  # refused, and no recipient accepted yet
    FLOW_ASKED = "flow asked"  # a MAIL waits for delivery to catch up before its 250
    FLOW_GRANTED = "flow granted"  # delivery caught up, or in_flow_delay passed: the MAIL is accepted
    EOF = "eof"  # the client closed
    CLOSE = "close"  # we close: QUIT, 421 (timeout, errors, shutdown, overflow)


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

# {input: {state: state after it}}. Anything else is a bug in the session.
EVENTS: dict[Input, dict[State, State]] = {
    Input.DATA_ACCEPTED: {State.DATA: State.WAIT_STORE},
    Input.DATA_REFUSED: {State.DATA: State.READY},
    Input.STORE_DONE: {State.WAIT_STORE: State.READY},
    Input.TLS_STARTED: {State.WAIT_TLS: State.CONNECTED},
    Input.AUTH_CHALLENGE: {State.READY: State.AUTH_INPUT, State.AUTH_INPUT: State.AUTH_INPUT},
    Input.AUTH_ANSWER: {State.AUTH_INPUT: State.WAIT_AUTH},
    Input.AUTH_ABORT: {State.AUTH_INPUT: State.READY},
    Input.AUTH_VERDICT: {State.WAIT_AUTH: State.READY},
    Input.VERIFY_ASKED: {State.MAIL: State.WAIT_VERIFY, State.RCPT: State.WAIT_VERIFY},
    Input.RCPT_VERIFIED: {State.WAIT_VERIFY: State.RCPT},
    Input.RCPT_UNVERIFIED: {State.WAIT_VERIFY: State.MAIL},
    Input.FLOW_ASKED: {State.READY: State.WAIT_FLOW},
    Input.FLOW_GRANTED: {State.WAIT_FLOW: State.MAIL},
    Input.EOF: {state: State.CLOSED for state in State},
    Input.CLOSE: {state: State.CLOSED for state in State},
}

KNOWN_VERBS = frozenset(verb for row in TRANSITIONS.values() for verb in row)
WAITING = frozenset({State.WAIT_STORE, State.WAIT_TLS, State.WAIT_AUTH, State.WAIT_VERIFY, State.WAIT_FLOW})
# WAIT_FLOW is not in a transaction yet: the group commit does not wait for sessions held at MAIL
IN_TRANSACTION = frozenset({State.MAIL, State.RCPT, State.DATA, State.WAIT_STORE, State.WAIT_VERIFY})


class IllegalTransition(RuntimeError):
    """The session tried a move its tables do not list."""


def allows(state: State, verb: str) -> bool:
    """Whether ``verb`` may be given in ``state`` (else 503 5.5.1)."""
    return verb in TRANSITIONS.get(state, {})


def next_state(state: State, trigger: str | Input) -> State:
    """Where ``trigger`` (a verb or an ``Input``) leads from ``state``."""
    try:
        if isinstance(trigger, Input):
            return EVENTS[trigger][state]
        return TRANSITIONS[state][trigger]
    except KeyError:
        raise IllegalTransition(f"{trigger!s} in state {state.value}") from None
