"""bench/signing.py: the message it signs and the bounded loop it measures with."""

from __future__ import annotations

from bench import signing


def test_message_is_4_kib_and_ends_in_crlf() -> None:
    msg = signing.message()
    assert len(msg) == 4096 and msg.endswith(b"\r\n") and b"\r\n\r\n" in msg


def test_per_message_is_bounded_by_time() -> None:
    calls: list[int] = []
    ms, n = signing.per_message(lambda: calls.append(1), 0.0)
    assert n == len(calls) == 1 and ms >= 0  # at least one call, then the time is up
