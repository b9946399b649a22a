"""tests/scheduling.py: the slow tests head the slices xdist's worksteal hands its workers."""

from __future__ import annotations

from typing import Any, cast

import pytest

from tests.scheduling import ordered, slices


class Item:
    def __init__(self, nodeid: str, slow: bool = False) -> None:
        self.nodeid = nodeid
        self.slow = slow

    def get_closest_marker(self, name: str) -> object | None:
        return object() if name == "slow" and self.slow else None

    def __repr__(self) -> str:
        return self.nodeid


def test_slices_are_what_worksteal_sends_first() -> None:
    assert slices(10, 3) == [3, 3, 4]
    assert slices(1521, 6) == [253, 253, 253, 254, 254, 254]
    assert slices(2, 4) == [0, 0, 1, 1]


def test_slow_groups_head_the_slices_chaos_first_one_module_each() -> None:
    items = [Item(f"tests/unit/test_a.py::t{i}") for i in range(10)]
    items.insert(2, Item("tests/integration/test_deploy.py::one", slow=True))
    items.insert(3, Item("tests/integration/test_deploy.py::two", slow=True))
    items.append(Item("tests/chaos/test_chaos.py::chaos", slow=True))
    items.append(Item("tests/integration/test_failover.py::failover", slow=True))
    order = [i.nodeid for i in ordered(cast(list[pytest.Item], items), 3)]
    assert sorted(order) == sorted(i.nodeid for i in items)  # nothing lost, nothing twice
    assert slices(14, 3) == [4, 5, 5]
    starts = [0, 4, 9]
    assert [order[s] for s in starts] == [
        "tests/chaos/test_chaos.py::chaos",
        "tests/integration/test_deploy.py::one",
        "tests/integration/test_failover.py::failover",
    ]
    assert order[5] == "tests/integration/test_deploy.py::two"  # the module's fixture built once
    # the others keep their order
    assert [n for n in order if "test_a" in n] == [f"tests/unit/test_a.py::t{i}" for i in range(10)]


def test_without_slow_tests_nothing_moves() -> None:
    items: list[Any] = [Item(f"t{i}") for i in range(5)]
    assert ordered(items, 3) == items
