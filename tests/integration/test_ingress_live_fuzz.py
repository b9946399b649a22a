"""Property-based tests against a live `mtaq ingress` (real redis-server behind it): arbitrary bytes
and arbitrary command sequences over a real socket.

For every example: the process stays up; every line the server writes is a well-formed SMTP reply
(RFC 5321 §4.2, enhanced codes of the reply's class); the messages that appear in Redis are exactly
those the client was told ``250 ... queued as ID`` -- nothing stored unless the transaction
completed, nothing acknowledged that is not stored.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures import MTA
from tests.integration.eventually import GENEROUS
from tests.integration.smtpwire import Reply, Wire, check_reply_lines

QUEUED = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]+)")


@pytest.fixture
def fuzz_mta(mta_factory: Callable[..., MTA]) -> Iterator[MTA]:
    # max_errors high: the server closes only on QUIT, a timeout or overflow, so the client always
    # reads every reply before the close (a close with unread input would reset the connection)
    mta = mta_factory(
        max_errors=100000,
        idle_timeout=5,
        max_message_size=4096,
        max_recipients=5,
        relay_domains="ours.test",
        log_level="INFO",
    )
    mta.start_ingress()
    yield mta
    assert mta.procs["ingress"].poll() is None, mta.logs()[-3000:]
    with Wire(mta.port) as w:  # still answers a fresh EHLO at the end
        ehlo = w.greet()
        assert ehlo.lines[0] == "mtaq.test"
    assert "Traceback" not in mta.logs(), mta.logs()[-5000:]


def exchange(port: int, chunks: list[bytes]) -> tuple[bytes, bool]:
    """Send the chunks, half-close, read to EOF. Returns (everything the server said, reset?)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=GENEROUS)
    out = bytearray()
    reset = False
    try:
        for c in chunks:
            try:
                s.sendall(c)
            except OSError:
                reset = True
                break
        if not reset:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:  # the server closed first (a QUIT among the chunks) and reset the rest
                reset = True
        deadline = time.monotonic() + GENEROUS  # only a server that never closes waits this long
        while time.monotonic() < deadline:
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            if not b:
                break
            out += b
        else:
            raise AssertionError(f"the server did not close after our EOF: {bytes(out[-300:])!r}")
    finally:
        s.close()
    return bytes(out), reset


def check(mta: MTA, chunks: list[bytes]) -> list[Reply]:
    before = set(mta.store.queue_ids())
    data, reset = exchange(mta.port, chunks)
    if reset:  # the reply stream may be cut anywhere: check the complete replies only
        lines = data.split(b"\r\n")[:-1]
        while lines and lines[-1][3:4] == b"-":
            lines.pop()
        data = b"".join(ln + b"\r\n" for ln in lines)
    replies = check_reply_lines(data)
    assert replies and replies[0].code == 220, data[:200]
    announced = {m.group(1) for r in replies if r.code == 250 and (m := QUEUED.fullmatch(r.text))}
    stored = set(mta.store.queue_ids()) - before
    if reset:
        assert announced <= stored
    else:
        assert stored == announced, (stored, announced, data[-500:])
    for qid in stored:
        msg = mta.store.load(qid)
        assert msg is not None and msg.body.startswith(b"Received: from ")
    assert mta.procs["ingress"].poll() is None, mta.logs()[-3000:]
    return replies


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_arbitrary_bytes(fuzz_mta: MTA) -> None:
    calls: list[int] = []

    @FUZZ
    @given(st.lists(st.one_of(st.binary(max_size=300), st.binary(max_size=3000)), max_size=6))
    def run(chunks: list[bytes]) -> None:
        calls.append(len(check(fuzz_mta, chunks)))

    run()
    print(f"arbitrary bytes: {len(calls)} connections, {sum(calls)} replies")
    assert len(calls) >= 250


VERBS = [
    "EHLO",
    "HELO",
    "MAIL",
    "RCPT",
    "DATA",
    "RSET",
    "NOOP",
    "VRFY",
    "EXPN",
    "HELP",
    "STARTTLS",
    "AUTH",
    "BDAT",
    "QUIT",
    "ehlo",
    "Mail",
    "rcpt",
]
COMMANDS = [
    b"EHLO client.test",
    b"HELO client.test",
    b"MAIL FROM:<a@client.test>",
    b"MAIL FROM:<>",
    b"MAIL FROM:<a@client.test> SIZE=100 BODY=8BITMIME",
    b"MAIL FROM:<a@client.test> SIZE=99999999",
    b"MAIL FROM:<a@client.test> RET=HDRS ENVID=x+2By",
    b"RCPT TO:<bob@ours.test>",
    b"RCPT TO:<bob@a.test>",
    b"RCPT TO:<bob@ours.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@ours.test",
    b"RCPT TO:<postmaster>",
    b"RCPT TO:<user%elsewhere@ours.test>",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"VRFY bob",
    b"HELP",
    b"STARTTLS",
    b"AUTH PLAIN AGFsaWNlAHB3",
    b"AUTH LOGIN",
    b"*",
    b"BDAT 5 LAST",
    b".",
    b"..",
    b"",
    b"Subject: x",
    b"body line",
    b".hidden",
    b"\x00",
    b"x" * 1200,
]
ENDINGS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""]
TRANSACTION = b"MAIL FROM:<a@client.test>\r\nRCPT TO:<bob@ours.test>\r\nDATA\r\nSubject: fuzz\r\n\r\nbody\r\n.\r\n"

line = st.one_of(
    st.sampled_from(COMMANDS),
    st.builds(
        lambda v, a: f"{v} {a}".encode(),
        st.sampled_from(VERBS),
        st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=40),
    ),
    st.binary(max_size=60),
)
element = st.one_of(
    st.tuples(line, st.sampled_from(ENDINGS)).map(lambda t: t[0] + t[1]),
    st.just(TRANSACTION),
)


def test_arbitrary_command_sequences(fuzz_mta: MTA) -> None:
    completed: list[int] = []

    @FUZZ
    @given(st.lists(element, min_size=1, max_size=25), st.booleans(), st.integers(1, 4))
    def run(elements: list[bytes], greet_first: bool, pieces: int) -> None:
        data = (b"EHLO client.test\r\n" if greet_first else b"") + b"".join(elements)
        size = max(1, len(data) // pieces)
        replies = check(fuzz_mta, [data[i : i + size] for i in range(0, len(data), size)])
        completed.append(sum(1 for r in replies if QUEUED.fullmatch(r.text)))

    run()
    print(f"command sequences: {len(completed)} connections, {sum(completed)} messages stored")
    assert len(completed) >= 250
    assert sum(completed) > 0, "no example ever completed a transaction: the strategy is too weak"


@pytest.mark.parametrize(
    "bad",
    [
        b"250 ok",  # no CRLF
        b"250 ok\n",  # bare LF
        b"25 ok\r\n",
        b"650 ok\r\n",
        b"2500 ok\r\n",
        b"250-ok\r\n",  # bad code; unfinished multi-line
        b"250-a\r\n251 b\r\n",  # code changes inside a reply
        b"550 2.0.0 mixed classes\r\n",
        b"250 caf\xc3\xa9\r\n",  # 8-bit text
        b"250 a\rb\r\n",
    ],
)
def test_reply_checker_rejects_malformed(bad: bytes) -> None:
    with pytest.raises(AssertionError):
        check_reply_lines(bad)
