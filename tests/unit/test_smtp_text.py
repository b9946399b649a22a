"""common/smtp/text.py: line_dot finds what a search for LF-dot finds, however many dots come first."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from common.smtp.text import DOT_HOPS, line_dot

PIECES = [b".", b"..", b"\n", b"\r\n", b"a", b"a.b", b"\n.", b"x" * 30, b"1.2.3.4.5.6.7.8.9"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=100), st.integers(0, 400), st.integers(0, 400))
def test_line_dot_is_the_search_for_lf_dot(pieces: list[bytes], start: int, length: int) -> None:
    buf = b"".join(pieces)
    end = min(len(buf), start + length)
    assert line_dot(buf, start, end) == buf.find(b"\n.", start, end)
    assert line_dot(bytearray(buf)) == buf.find(b"\n.")


def test_past_the_hops_the_search_takes_over() -> None:
    inline = b"a.b\r\n" * (DOT_HOPS + 3)
    buf = inline + b".x\r\n"
    assert line_dot(buf) == len(inline) - 1
    assert line_dot(b".at the start only\r\n") == -1  # the first line's dot follows no LF
    assert line_dot(b"", 0, 0) == -1
