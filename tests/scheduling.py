"""The order `make test` runs the tests in side by side: the long ones first, each on its own
pytest-xdist worker.

The suite's time on 2 cores is set by its longest tests (the chaos test alone waits ~2.5 minutes
on killed processes), not by the CPU: started last, or two on one worker, they end the run
minutes after everything else. With ``--dist worksteal`` xdist hands worker i the i-th of N
consecutive slices of the collection, and a worker that runs dry takes half of the busiest one's
queue. So the tests marked ``slow`` (grouped by module: a module-scoped fixture such as the
deployment is built once) are placed at the start of the slices, one group a slice, and whatever
waits behind them is taken over by the workers that finish first.

This changes only the order; without xdist (``-n 0``) or with another ``--dist`` nothing moves.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["ordered", "slices"]


def slices(total: int, workers: int) -> list[int]:
    """The sizes of the consecutive slices ``--dist worksteal`` first sends its workers (it gives
    each idle worker ``pending // workers still to serve``)."""
    sizes = []
    for i in range(workers):
        size = total // (workers - i)
        sizes.append(size)
        total -= size
    return sizes


def _groups(items: list[pytest.Item]) -> tuple[list[list[pytest.Item]], list[pytest.Item]]:
    """(the slow tests grouped by module, chaos first, then in collection order; the others)."""
    groups: dict[str, list[pytest.Item]] = {}
    rest = []
    for item in items:
        if item.get_closest_marker("slow") is None:
            rest.append(item)
        else:
            groups.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    ordered = sorted(groups.items(), key=lambda kv: not kv[0].startswith("tests/chaos/"))
    return [g for _, g in ordered], rest


def ordered(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """``items`` in the order that puts each group of slow tests at the head of a slice."""
    groups, rest = _groups(items)
    if not groups:
        return items
    # slice i gets groups i, i + workers, ...; the rest of it is filled from the other tests
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for i, group in enumerate(groups):
        heads[i % workers].extend(group)
    order: list[pytest.Item] = []
    others = iter(rest)
    for head, size in zip(heads, slices(len(items), workers), strict=True):
        order.extend(head)
        order.extend(item for _, item in zip(range(size - len(head)), others, strict=False))
    order.extend(others)
    return order


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers >= 2 and config.getoption("dist", "no") == "worksteal":
        items[:] = ordered(items, workers)
