"""The session's state table: one writer, and every move listed."""

from __future__ import annotations

import ast
import inspect

import pytest

from ingress import session
from ingress.states import EVENTS, TRANSITIONS, IllegalTransition, Input, State, allows, next_state


def test_transition_is_the_only_writer_of_the_state() -> None:
    tree = ast.parse(inspect.getsource(session))
    writers = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for sub in ast.walk(node):
                targets = sub.targets if isinstance(sub, ast.Assign) else []
                if isinstance(sub, ast.AugAssign | ast.AnnAssign):
                    targets = [sub.target]
                if any(isinstance(t, ast.Attribute) and t.attr == "_state" for t in targets):
                    writers.append(node.name)
    assert writers == ["__init__", "_transition"]


def test_moves_the_tables_do_not_list_are_bugs() -> None:
    assert next_state(State.RCPT, "DATA") is State.DATA
    assert next_state(State.DATA, Input.DATA_ACCEPTED) is State.WAIT_STORE
    with pytest.raises(IllegalTransition):
        next_state(State.READY, "DATA")
    with pytest.raises(IllegalTransition):
        next_state(State.READY, Input.STORE_DONE)
    assert not allows(State.WAIT_STORE, "NOOP")  # waiting states take no verbs at all


def test_every_state_is_reachable_and_can_close() -> None:
    reachable = {State.CONNECTED}
    edges = [(a, b) for a, row in TRANSITIONS.items() for b in row.values()]
    edges += [(a, b) for moves in EVENTS.values() for a, b in moves.items()]
    while True:
        more = {b for a, b in edges if a in reachable} - reachable
        if not more:
            break
        reachable |= more
    assert reachable == set(State)
    assert all(EVENTS[Input.CLOSE][s] is State.CLOSED and EVENTS[Input.EOF][s] is State.CLOSED for s in State)
