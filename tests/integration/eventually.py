"""Waiting for an event instead of guessing how long it takes.

A live test waits for what it expects (a log line, a condition) up to a generous bound that only
matters when the thing never happens; it never asserts that something took less than N seconds of
wall clock, which a loaded machine turns into a flake. Where a test must tell "at once" from "at a
deadline", the deadline is configured far beyond the bound instead (a separation by a factor, not
a guess).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.sinks import wait_for

__all__ = ["GENEROUS", "eventually", "wait_for_log"]

# Seconds to wait for something that normally takes milliseconds. Only a failing test waits this long.
GENEROUS = 60.0


def eventually(check: Callable[[], bool], what: str, timeout: float = GENEROUS, interval: float = 0.05) -> None:
    """Return once ``check()`` is true; AssertionError naming ``what`` if it never is."""
    assert wait_for(check, timeout, interval), f"{what}: not seen within {timeout:.0f} s"


def wait_for_log(path: Path, text: str, timeout: float = GENEROUS, *, count: int = 1) -> str:
    """Wait until ``text`` occurs ``count`` times in the log file at ``path``; returns the log."""
    seen = ""

    def found() -> bool:
        nonlocal seen
        seen = path.read_text(errors="replace") if path.exists() else ""
        return seen.count(text) >= count

    eventually(found, f"log line {text!r} in {path.name}", timeout)
    return seen
