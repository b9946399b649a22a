"""worker/plan.py: what a job does with the messages it loaded, without Redis."""

from __future__ import annotations

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.store import Message
from worker.plan import DUE_SLACK, plan

NOW = 10_000.0


def msg(qid: str, *rcpts: str) -> Message:
    return Message(Envelope(id=qid, sender="a@x.test", recipients=[Recipient(r) for r in rcpts]), b"x")


def domain(address: str) -> str:
    return address.rpartition("@")[2]


DEFERRED_DUE = RecipientStatus(state=RcptState.DEFERRED, next_attempt=NOW + DUE_SLACK)
DEFERRED_LATER = RecipientStatus(state=RcptState.DEFERRED, next_attempt=NOW + 600)
SENT = RecipientStatus(state=RcptState.DELIVERED)


def test_due_recipients_are_those_for_this_destination_pending_or_due() -> None:
    m = msg("Q1", "a@y.test", "b@y.test", "c@z.test", "d@y.test", "e@y.test")
    states = {1: DEFERRED_DUE, 3: DEFERRED_LATER, 4: SENT}
    p = plan("y.test", ["Q1"], [(m, states)], set(), domain, NOW)
    assert p.due == {"Q1": [0, 1]} and list(p.loaded) == ["Q1"]
    assert p.complete == p.held == p.gone == [] and p.reroute == {}


def test_a_flush_takes_what_is_not_due_yet() -> None:
    m = msg("Q1", "a@y.test")
    p = plan("y.test", ["Q1"], [(m, {0: DEFERRED_LATER})], set(), domain, NOW, force=True)
    assert p.due == {"Q1": [0]}


def test_held_gone_and_complete_messages() -> None:
    held, done = msg("QH", "a@y.test"), msg("QC", "a@y.test")
    p = plan("y.test", ["QH", "QG", "QC"], [(held, {}), None, (done, {0: SENT})], {"QH"}, domain, NOW)
    assert p.held == ["QH"] and p.gone == ["QG"] and p.complete == ["QC"]
    assert p.due == {} and list(p.loaded) == ["QC"]  # complete ones are loaded: the job finishes them


def test_a_changed_relayhost_reroutes_once_per_message() -> None:
    m = msg("Q1", "a@y.test", "b@y.test")
    p = plan("y.test", ["Q1"], [(m, {})], set(), lambda a: "[relay.test]:25", NOW)
    assert p.reroute == {"[relay.test]:25": ["Q1"]} and p.due == {}


def test_busy_is_what_the_leases_left_out() -> None:
    p = plan("y.test", ["Q1", "Q2"], [(msg("Q1", "a@y.test"), {}), (msg("Q2", "b@y.test"), {})], set(), domain, NOW)
    assert p.busy(["Q2"]) == ["Q1"] and p.busy(["Q1", "Q2"]) == []
