"""DataReader's many-lines-at-once path says exactly what its line-at-a-time path says, for any
input cut anywhere: the same message, the same refusal, the same end, the same input left over."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.smtp.text import DOT_HOPS
from ingress import readers
from ingress.limits import MAX_TEXT_LINE
from ingress.readers import DataReader, DataStep, LineReader, _only_crlf


class LineAtATime(DataReader):
    def _bulk(self, lines: LineReader) -> bool:
        return False


def read(reader: DataReader, chunks: list[bytes]) -> tuple[bytes, object, bool, bytes]:
    lines = LineReader()
    ended = False
    for c in chunks:
        lines.feed(c)
        while (step := reader.step(lines)) is DataStep.LINE:
            pass
        if step is DataStep.END:
            ended = True
            break
    rest = bytes(lines._buf)
    return reader.take(), reader.refusal, ended, rest


# the dotted pieces use up line_dot's memchr hops (DOT_HOPS) within a few lines; the long ones make
# lines of every length around MAX_TEXT_LINE and its half-windows
PIECES = [
    b"a",
    b"text ",
    b".",
    b"..",
    b"\r\n",
    b"\r",
    b"\n",
    b"\0",
    b"\r\n.\r\n",
    b"\n.\n",
    b"x" * 400,
    b"y" * 499,
    b"a.b.c.d.e.f.g.h",
]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES), max_size=80),
    st.lists(st.integers(1, 700), min_size=1, max_size=8),
    st.sampled_from([50, 2000, 10_000_000]),
)
def test_bulk_agrees_with_line_at_a_time(pieces: list[bytes], cuts: list[int], max_size: int) -> None:
    data = b"".join(pieces) + b"\r\n.\r\n"
    chunks, i, n = [], 0, 0
    while i < len(data):
        size = cuts[n % len(cuts)]
        chunks.append(data[i : i + size])
        i, n = i + size, n + 1
    assert read(DataReader(max_size), chunks) == read(LineAtATime(max_size), chunks)


def test_a_large_plain_message_is_read_whole() -> None:
    body = (b"y" * 76 + b"\r\n") * 20_000
    assert read(DataReader(10_000_000), [body, b".\r\n"]) == (body, None, True, b"")


def test_overlong_line_found_in_bulk() -> None:
    body = b"ok\r\n" + b"z" * MAX_TEXT_LINE + b"\r\n"
    got = read(DataReader(10_000_000), [body, b".\r\n"])
    assert got == read(LineAtATime(10_000_000), [body, b".\r\n"]) and got[1] is not None


def test_line_starting_dot_after_many_dots_inside_lines() -> None:
    """Past DOT_HOPS dots inside lines, a line that starts with a dot is still unstuffed."""
    inline = b"see a.b and c.d\r\n" * DOT_HOPS
    body = inline + b"..stuffed\r\n" + inline + b"..again\r\n"
    want = inline + b".stuffed\r\n" + inline + b".again\r\n"
    got = read(DataReader(10_000_000), [body, b".\r\n"])
    assert got == (want, None, True, b"") == read(LineAtATime(10_000_000), [body, b".\r\n"])


def test_line_lengths_at_the_limit_anywhere_in_a_chunk() -> None:
    """The window check finds a line one octet too long wherever it starts; one at the limit passes."""
    for offset in range(0, MAX_TEXT_LINE - 2, 37):
        head = b"h" * offset + b"\r\n"
        ok = head + b"k" * (MAX_TEXT_LINE - 2) + b"\r\n"
        assert read(DataReader(10_000_000), [ok, b".\r\n"]) == (ok, None, True, b"")
        bad = head + b"k" * (MAX_TEXT_LINE - 1) + b"\r\n"
        got = read(DataReader(10_000_000), [bad, b".\r\n"])
        assert got[1] is not None and got == read(LineAtATime(10_000_000), [bad, b".\r\n"])


@pytest.mark.parametrize("line", [b"x" * 76, b"", b"a"], ids=["78-octet lines", "empty lines", "1-octet lines"])
def test_bare_cr_and_lf_are_found_in_every_shape_of_line(line: bytes) -> None:
    # every shape of line: 78-octet lines, empty ones, one-octet ones
    text = bytearray((line + b"\r\n") * 3000)
    assert _only_crlf(text, len(text))
    n = len(line) + 2
    for at in (0, n, n * 1500, len(text) - n):  # line boundaries: first, second, middle, last
        for bad in (b"\r", b"\n"):
            spoiled = text[:at] + b"q" + bad + b"q\r\n" + text[at:]
            assert not _only_crlf(spoiled, len(spoiled)), (line, at, bad)
    tail = text + b"partial line\r"  # what follows ``end`` is no part of the check
    assert _only_crlf(tail, len(text)) and not _only_crlf(tail + b"x\r\n", len(tail) + 3)
    lines_after_a_dot = text + b"bare\n" * 2000  # more than is translated along (readers._TAIL_KEPT)
    assert _only_crlf(lines_after_a_dot, len(text))


def test_a_bad_line_late_in_a_chunk_is_not_looked_for_again_after_every_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lines before it go one at a time, once: a look at the rest after each was quadratic (64
    KiB of short lines before a NUL held the event loop for 1.4 s)."""
    looks: list[int] = []
    real = readers._only_crlf

    def counted(buf: bytearray, end: int) -> bool:
        looks.append(end)
        return real(buf, end)

    monkeypatch.setattr(readers, "_only_crlf", counted)
    lines, data = LineReader(), DataReader(10_000_000)
    lines.feed(b"a\r\n" * 20_000 + b"b\0\r\n" + b"c\r\n" * 10 + b".\r\n")
    steps = 0
    while data.step(lines) is not DataStep.END:
        steps += 1
    assert data.refusal is not None and data.refusal.code == 554
    assert len(looks) == 1 and steps == 20_011


def test_after_the_lines_it_could_not_take_the_bulk_path_takes_over_again() -> None:
    lines, data = LineReader(), DataReader(10_000_000)
    long_ok = b"x" * 990 + b"\r\n"
    lines.feed(b"a\r\n" * 5 + b"." * 1 + b"dot\r\n" + long_ok * 3 + b"b\r\n" * 1000)
    steps = 0
    while data.step(lines) is not DataStep.MORE:
        steps += 1
    assert data.refusal is None and steps < 20, "the dot line alone went a line at a time"
    assert bytes(data._data) == b"a\r\n" * 5 + b"dot\r\n" + long_ok * 3 + b"b\r\n" * 1000
