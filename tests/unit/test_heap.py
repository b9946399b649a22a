"""common/heap.py: start-up's objects frozen out of the collector, young collections rarer."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from common.heap import YOUNG_THRESHOLD, settle


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_settle_freezes_what_exists_and_spaces_young_collections() -> None:
    gc.unfreeze()
    _, older, oldest = gc.get_threshold()
    settle()
    assert gc.get_freeze_count() > 1000  # the interpreter's and the imported modules' objects
    assert gc.get_threshold() == (YOUNG_THRESHOLD, older, oldest)


@pytest.mark.usefixtures("restored_gc")
def test_cycles_made_after_settle_are_still_collected() -> None:
    settle()

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2
