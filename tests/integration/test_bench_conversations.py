"""bench/conversations.py, small: both drivers of the sans-IO client carry every message to the
loopback sink (a process of its own) and report what they measured."""

from __future__ import annotations

import pytest

from bench.conversations import measure


@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_every_conversation_delivers_and_is_measured(mode: str) -> None:
    r = measure(mode, 20, 3, 0.0)
    assert (r.mode, r.n, r.sent) == (mode, 20, 60)
    assert r.cpu > 0 and r.rss_kib > 0 and r.wall > 0
