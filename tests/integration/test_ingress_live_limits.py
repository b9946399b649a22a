"""Limits and bad input over a real socket against a live `mtaq ingress` (real redis-server behind).

Every test asserts the exact reply code and RFC 3463 enhanced code, that the connection survives
where it should (a NOOP after the error) or is closed where it must be, and what Redis holds.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable

import pytest

from tests.fixtures import MTA, fresh
from tests.integration.eventually import GENEROUS, eventually, wait_for_log
from tests.integration.smtpwire import Wire

SIZE_LIMIT = 20000
# More NOOPs than the socket buffers between us and the ingress can hold (tcp_rmem's ceiling is
# 32 MiB): a server still reading after this many has not applied write flow control.
MAX_OCTETS = 64 << 20


@pytest.fixture(scope="module")
def shared_mta(module_mta_factory: Callable[..., MTA]) -> MTA:
    """One ingress for every test of this module that needs no settings of its own."""
    m = module_mta_factory(max_message_size=SIZE_LIMIT, max_recipients=3, max_errors=100, relay_domains="ours.test")
    m.start_ingress()
    return m


@pytest.fixture
def mta(shared_mta: MTA) -> MTA:
    return fresh(shared_mta)


def transaction(w: Wire, rcpts: tuple[str, ...] = ("bob@ours.test",), sender: str = "alice@client.test") -> None:
    assert w.cmd(f"MAIL FROM:<{sender}>").status == (250, "2.1.0")
    for r in rcpts:
        assert w.cmd(f"RCPT TO:<{r}>").status == (250, "2.1.5")
    assert w.cmd("DATA").code == 354


def queued(reply_text: str) -> str:
    assert reply_text.startswith("2.0.0 Ok: queued as "), reply_text
    return reply_text.rsplit(" ", 1)[-1]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_command_line_limit(mta: MTA) -> None:
    with Wire(mta.port) as w:
        w.greet()
        exact = "NOOP " + "x" * (512 - 2 - 5)  # 512 octets with the CRLF (RFC 5321 §4.5.3.1.4)
        assert w.cmd(exact).status == (250, "2.0.0")
        assert w.cmd(exact + "x").status == (500, "5.5.2")
        assert w.cmd("HELO " + "h" * 600).status == (500, "5.5.2")
        # a line far beyond every limit, sent in pieces: discarded as it comes, answered once
        for _ in range(10):
            w.send(b"A" * 4000)
        assert w.cmd("").status == (500, "5.5.2")
        assert w.cmd("NOOP").status == (250, "2.0.0")


def test_message_size_limit(mta: MTA) -> None:
    with Wire(mta.port) as w:
        ehlo = w.greet()
        assert f"SIZE {SIZE_LIMIT}" in ehlo.lines
        assert w.cmd(f"MAIL FROM:<a@client.test> SIZE={SIZE_LIMIT + 1}").status == (552, "5.3.4")
        assert w.cmd("MAIL FROM:<a@client.test> SIZE=" + "9" * 21).status == (501, "5.5.4")
        # a client that declares a small SIZE and sends more is caught while reading DATA
        assert w.cmd("MAIL FROM:<a@client.test> SIZE=100").status == (250, "2.1.0")
        assert w.cmd("RCPT TO:<bob@ours.test>").status == (250, "2.1.5")
        assert w.cmd("DATA").code == 354
        w.send(b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 300)  # 30 kB
        assert w.cmd(".").status == (552, "5.3.4")
        assert w.cmd("NOOP").status == (250, "2.0.0")  # the connection survives
        transaction(w)
        ok = w.cmd(b"Subject: small\r\n\r\n" + (b"y" * 98 + b"\r\n") * 150 + b".")  # 15 kB
        assert ok.status == (250, "2.0.0")
    assert mta.store.queue_ids() == [queued(ok.text)]


def test_text_line_limit(mta: MTA) -> None:
    with Wire(mta.port) as w:
        w.greet()
        transaction(w)
        w.send(b"Subject: long\r\n\r\n" + b"z" * 999 + b"\r\n")  # 1001 octets with CRLF
        assert w.cmd(".").status == (500, "5.5.2")
        transaction(w)
        w.send(b"Subject: long\r\n\r\n" + b"z" * 998 + b"\r\n..dot-stuffed\r\n")  # exactly 1000
        ok = w.cmd(".")
        assert ok.status == (250, "2.0.0")
    [qid] = mta.store.queue_ids()
    stored = mta.store.load(qid)
    assert stored is not None and stored.body.endswith(b"z" * 998 + b"\r\n.dot-stuffed\r\n")


def test_too_many_recipients(mta: MTA) -> None:
    with Wire(mta.port) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<a@client.test>").status == (250, "2.1.0")
        for i in range(3):
            assert w.cmd(f"RCPT TO:<r{i}@ours.test>").status == (250, "2.1.5")
        assert w.cmd("RCPT TO:<r3@ours.test>").status == (452, "4.5.3")
        assert w.cmd("RCPT TO:<r4@ours.test>").status == (452, "4.5.3")
        assert w.cmd("DATA").code == 354
        ok = w.cmd(b"Subject: three\r\n\r\nx\r\n.")
        assert ok.status == (250, "2.0.0")
    stored = mta.store.load(queued(ok.text))
    assert stored is not None
    assert [r.address for r in stored.envelope.recipients] == ["r0@ours.test", "r1@ours.test", "r2@ours.test"]


BAD_ADDRESSES = [
    "<a b@ours.test>",
    "<user@>",
    "<@ours.test>",
    "<user@-bad-.test>",
    "<user@exa_mple.test>",
    "<user@[1.2.3.999]>",
    "<user@[tag:whatever]>",
    '<"unterminated@ours.test>',
    "<..dots@ours.test>",
    "<user@ours..test>",
    "<user@ours.test@other.test>",
    "<" + "l" * 65 + "@ours.test>",
    "<user@" + "d" * 64 + ".test>",
    "<user@ours.test",
    "<>",
]


def test_bad_address_syntax(mta: MTA) -> None:
    with Wire(mta.port) as w:
        w.greet()
        assert w.cmd("MAIL FROM:<no-domain>").status == (501, "5.1.3")
        assert w.cmd("MAIL FROM:<a@b@c.test>").status == (501, "5.1.3")
        assert w.cmd("MAIL FROM:<a@client.test>").status == (250, "2.1.0")
        for addr in BAD_ADDRESSES:
            assert w.cmd(f"RCPT TO:{addr}").status == (501, "5.1.3"), addr
        assert w.cmd("RCPT TO:<bób@ours.test>").status == (553, "5.6.7")  # UTF-8 without SMTPUTF8
        assert w.cmd("RCPT TO:bob@ours.test").status == (250, "2.1.5")  # brackets optional (Postfix)
        assert w.cmd("NOOP").status == (250, "2.0.0")


def test_too_many_errors_closes(mta_factory: Callable[..., MTA]) -> None:
    mta = mta_factory(max_errors=3)
    mta.start_ingress()
    with Wire(mta.port) as w:
        w.greet()
        assert w.cmd("FOO").status == (500, "5.5.1")
        assert w.cmd("RCPT TO:<x@y.test>").status == (503, "5.5.1")
        assert w.cmd("BAR").status == (500, "5.5.1")
        assert w.reply().status == (421, "4.7.0")
        assert w.closed(timeout=GENEROUS)


def test_idle_timeout(mta_factory: Callable[..., MTA]) -> None:
    mta = mta_factory(idle_timeout=1)
    mta.start_ingress()
    with Wire(mta.port) as w:
        w.greet()
        t0 = time.monotonic()
        assert w.reply(timeout=GENEROUS).status == (421, "4.4.2")
        # a deadline never fires early, whatever the load; how late it may fire is the machine's
        assert time.monotonic() - t0 >= 0.9
        assert w.closed(timeout=GENEROUS)
    with Wire(mta.port) as w:  # in the middle of DATA as well
        w.greet()
        transaction(w, ("bob@a.test",))
        w.send(b"Subject: half\r\n")
        assert w.reply(timeout=GENEROUS).status == (421, "4.4.2")
        assert w.closed(timeout=GENEROUS)
    log = wait_for_log(mta.log_dir / "ingress.log", "timeout after DATA from [127.0.0.1]")
    assert "timeout after command from [127.0.0.1]" in log
    assert mta.store.queue_ids() == []


def test_activity_moves_the_idle_deadline(mta_factory: Callable[..., MTA]) -> None:
    # the idle timer is not made again per command: it fires at its first deadline and, the client
    # having spoken since, waits for the new one. A NOOP every 0.5 s for 3.5 s (past the first
    # deadline, and the second) keeps the connection; silence then ends it
    mta = mta_factory(idle_timeout=2)
    mta.start_ingress()
    with Wire(mta.port) as w:
        w.greet()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.5:
            time.sleep(0.5)
            assert w.cmd("NOOP").code == 250
        assert w.reply(timeout=GENEROUS).status == (421, "4.4.2")
        assert w.closed(timeout=GENEROUS)


def greeted(port: int, source: str = "127.0.0.1") -> Wire:
    """A greeted connection; retried while the start-up probe of ``wait_port`` may still hold a slot."""
    deadline = time.monotonic() + GENEROUS
    while True:
        w = Wire(port, source=source)
        first = w.reply()
        if first.code == 220:
            assert w.cmd("EHLO client.test").code == 250
            return w
        w.close()
        assert first.status == (421, "4.7.0") and time.monotonic() < deadline, first
        time.sleep(0.05)


def test_connection_limits(mta_factory: Callable[..., MTA]) -> None:
    mta = mta_factory(max_connections_per_client=2, max_connections=4)
    mta.start_ingress()
    a, b = greeted(mta.port), greeted(mta.port)
    with Wire(mta.port) as third:
        assert third.reply().status == (421, "4.7.0")
        assert third.closed(timeout=GENEROUS)
    with Wire(mta.port, source="127.0.0.2") as other:  # per client address, not global
        other.greet()
        with Wire(mta.port, source="127.0.0.3") as fourth:
            fourth.greet()
            with Wire(mta.port, source="127.0.0.4") as fifth:  # max_connections in all
                assert fifth.reply().status == (421, "4.7.0")
                assert fifth.closed(timeout=GENEROUS)
    b.cmd("QUIT")
    assert b.closed()
    # the slot comes back as soon as the server has seen the close

    def slot_back() -> bool:
        with Wire(mta.port) as again:
            return again.reply().code == 220

    eventually(slot_back, "the closed connection's slot back")
    assert a.cmd("NOOP").status == (250, "2.0.0")
    a.close()


def test_nul_bytes(mta: MTA) -> None:
    with Wire(mta.port) as w:
        w.greet()
        assert w.cmd(b"NO\x00OP").status == (500, "5.5.2")
        assert w.cmd(b"MAIL FROM:<a\x00b@client.test>").status == (500, "5.5.2")
        assert w.cmd(b"\x00").status == (500, "5.5.2")
        transaction(w)
        assert w.cmd(b"Subject: nul\r\n\r\nbefore\x00after\r\n.").status == (554, "5.6.0")
        assert w.cmd("NOOP").status == (250, "2.0.0")
    assert mta.store.queue_ids() == []


def test_commands_out_of_order(mta: MTA) -> None:
    with Wire(mta.port) as w:
        assert w.reply().code == 220
        assert w.cmd("MAIL FROM:<a@client.test>").status == (503, "5.5.1")  # before HELO/EHLO
        assert w.cmd("EHLO client.test").code == 250
        assert w.cmd("RCPT TO:<bob@ours.test>").status == (503, "5.5.1")  # before MAIL
        assert w.cmd("DATA").status == (503, "5.5.1")  # before MAIL
        assert w.cmd("MAIL FROM:<a@client.test>").status == (250, "2.1.0")
        assert w.cmd("MAIL FROM:<a@client.test>").status == (503, "5.5.1")  # nested MAIL
        assert w.cmd("DATA").status == (503, "5.5.1")  # without RCPT
        assert w.cmd("BDAT 10 LAST").status == (500, "5.5.1")  # CHUNKING not offered
        assert w.cmd("STARTTLS").status == (503, "5.5.1")  # inside a transaction
        assert w.cmd("RCPT TO:<bob@ours.test>").status == (250, "2.1.5")
        assert w.cmd("DATA extra").status == (501, "5.5.4")
        assert w.cmd("DATA").code == 354
        ok = w.cmd(b"Subject: in order at last\r\n\r\nx\r\n.")
        assert ok.status == (250, "2.0.0")
    assert mta.store.queue_ids() == [queued(ok.text)]


def test_eight_bit_data_without_8bitmime_is_kept(mta: MTA) -> None:
    # RFC 6152 leaves it to the server; Postfix accepts and so do we, octets untouched
    with Wire(mta.port) as w:
        w.greet()
        transaction(w)
        ok = w.cmd("Subject: café\r\n\r\nnaïve\r\n.".encode())
        assert ok.status == (250, "2.0.0")
    stored = mta.store.load(queued(ok.text))
    assert stored is not None and stored.body.endswith("Subject: café\r\n\r\nnaïve\r\n".encode())
    assert stored.envelope.body_8bit is False


SMUGGLED = b"MAIL FROM:<evil@client.test>\r\nRCPT TO:<victim@ours.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n"


@pytest.mark.parametrize(
    "sequence",
    [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r"],
    ids=["LF.LF", "CRLF.LF", "LF.CRLF", "CR.CR", "CR.CRLF", "CRLF.CR"],
)
def test_smtp_smuggling_is_impossible(mta: MTA, sequence: bytes) -> None:
    # CVE-2023-51764 family: a bare LF or CR around the dot neither ends the message nor lets the
    # commands behind it run. The message is refused whole (Postfix smtpd_forbid_bare_newline).
    with Wire(mta.port) as w:
        w.greet()
        transaction(w)
        w.send(b"Subject: outer\r\n\r\nhello" + sequence + SMUGGLED + b".\r\n")
        assert w.reply().status == (550, "5.6.0")  # one reply to the whole DATA...
        assert w.cmd("NOOP").status == (250, "2.0.0")  # ...and none to the smuggled commands
        assert not w.buf
    assert mta.store.queue_ids() == []


def test_smuggling_control_real_end_of_data_does_end_it(mta: MTA) -> None:
    # the same bytes with CRLF.CRLF: two messages -- this is what the test above would see if the
    # server let a smuggling sequence through
    with Wire(mta.port) as w:
        w.greet()
        transaction(w)
        w.send(b"Subject: outer\r\n\r\nhello\r\n.\r\n" + SMUGGLED + b".\r\n")
        first = w.reply()
        assert first.status == (250, "2.0.0")
        assert [w.reply().status for _ in range(3)] == [(250, "2.1.0"), (250, "2.1.5"), (354, "")]
        second = w.reply()
        assert second.status == (250, "2.0.0")
    assert sorted(mta.store.queue_ids()) == sorted([queued(first.text), queued(second.text)])
    bodies = [m.body for m in map(mta.store.load, mta.store.queue_ids()) if m is not None]
    assert [b.split(b"\r\n\r\n", 1)[1] for b in bodies] == [b"hello\r\n", b"evil\r\n"]


def test_bare_lf_lines_in_data_are_refused(mta: MTA) -> None:
    with Wire(mta.port) as w:
        w.greet()
        transaction(w)
        assert w.cmd(b"Subject: lf\n\nline one\nline two\r\n.").status == (550, "5.6.0")
        transaction(w)
        assert w.cmd(b"Subject: cr\r\n\r\nline\rone\r\n.").status == (550, "5.6.0")
    assert mta.store.queue_ids() == []


# -- slow clients ----------------------------------------------------------------------------------------
def test_slowloris_is_cut(mta_factory: Callable[..., MTA]) -> None:
    # a byte every 0.3 s, never a whole line: cut at the idle deadline, in a command and in DATA
    mta = mta_factory(idle_timeout=2)
    mta.start_ingress()
    results: dict[str, tuple[float, tuple[int, str] | None, int]] = {}

    def slow(name: str, in_data: bool) -> None:
        with Wire(mta.port, timeout=GENEROUS) as w:
            w.greet()
            if in_data:
                transaction(w, ("bob@a.test",))
                prefix = b""
            else:
                prefix = b"MAIL FROM:<"
            w.send(prefix)
            t0 = time.monotonic()
            sent = 0
            try:
                # bounded only for a server that never cuts us
                while time.monotonic() - t0 < GENEROUS:
                    w.sock.sendall(b"a")
                    sent += 1
                    if w.closed(timeout=0.3):
                        break
            except OSError:
                pass
            results[name] = (time.monotonic() - t0, check_tail(w), sent)

    def check_tail(w: Wire) -> tuple[int, str] | None:
        try:
            return w.reply(timeout=0.1).status
        except Exception:
            return None

    threads = [
        threading.Thread(target=slow, args=("command", False)),
        threading.Thread(target=slow, args=("data", True)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GENEROUS + 10)
    for name in ("command", "data"):
        elapsed, last, sent = results[name]
        assert elapsed >= 1.8, (name, elapsed)  # not before the deadline (it never fires early)
        assert elapsed < GENEROUS, (name, elapsed)  # but it did fire: the bytes did not rearm it
        assert last == (421, "4.4.2"), (name, last)
        assert sent >= 5, (name, sent)  # it really did dribble bytes all along
    log = wait_for_log(mta.log_dir / "ingress.log", "timeout after DATA from [127.0.0.1]")
    assert "timeout after command from [127.0.0.1]" in log
    assert mta.store.queue_ids() == []  # nothing from the slow DATA client


def test_slow_clients_do_not_slow_others(mta_factory: Callable[..., MTA]) -> None:
    # Two clients stopped halfway through a command and through a DATA line, with an idle deadline
    # far beyond every timeout below: the other client's messages can only complete if the server
    # serves it while the slow ones are still connected -- an ordering, not a measured latency.
    mta = mta_factory(idle_timeout=600)
    mta.start_ingress()
    with Wire(mta.port, timeout=GENEROUS) as command, Wire(mta.port, timeout=GENEROUS) as data:
        command.greet()
        command.send(b"MAIL FROM:<a")
        data.greet()
        transaction(data, ("bob@a.test",))
        data.send(b"Subject: slow\r\n\r\nhal")
        ids = [mta.send("alice@client.test", ["bob@a.test"], f"Subject: quick {i}\r\n\r\nx\r\n") for i in range(10)]
        # both slow clients are still there, and each finishes what it started
        data.send(b"f\r\n")
        slow = data.cmd(".")
        assert slow.status == (250, "2.0.0"), slow
        assert command.cmd("@client.test>").status == (250, "2.1.0")
    assert sorted(mta.store.queue_ids()) == sorted([*ids, queued(slow.text)])


@pytest.mark.slow
def test_client_that_never_reads_is_cut(mta_factory: Callable[..., MTA]) -> None:
    # pipelined NOOPs without reading a single reply: the server must stop reading once its output
    # backs up, so its memory stays bounded, and cut the client at the idle timeout. Bounded by
    # octets, not by wall clock: a server that kept reading would take all of MAX_OCTETS (more than
    # every kernel buffer on the path can hold) on any machine; a loaded one only takes longer.
    mta = mta_factory(idle_timeout=1)
    mta.start_ingress()
    pid = mta.procs["ingress"].pid
    before = rss_kib(pid)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # set before connect, so that the handshake advertises a small window: the replies back up
    # after a few KiB instead of filling autotuned megabytes first
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    s.connect(("127.0.0.1", mta.port))
    s.setblocking(False)
    chunk = b"NOOP\r\n" * 10000
    sent, stalls, cut = 0, 0, False
    deadline = time.monotonic() + GENEROUS  # only a server that never cuts us waits this long
    try:
        while sent < MAX_OCTETS and time.monotonic() < deadline:
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                stalls += 1
                select.select([], [s], [s], 0.2)  # writable again, or reset
    except OSError:  # reset by the server
        cut = True
    finally:
        s.close()
    assert sent < MAX_OCTETS, f"the server read {sent} octets of NOOPs without stopping"
    assert cut, f"still connected after {GENEROUS:.0f} s, {sent} octets sent"
    assert stalls > 0  # our sends blocked: the server had stopped reading before it cut us
    # and it was the idle deadline that cut us, nothing else
    wait_for_log(mta.log_dir / "ingress.log", "timeout after command from [127.0.0.1]")
    grown = rss_kib(pid) - before
    print(f"never-reads: {sent} octets sent, {stalls} stalls, ingress RSS +{grown} KiB")
    assert grown < 10_000, f"ingress grew by {grown} KiB for {sent} octets of NOOPs"
    assert mta.procs["ingress"].poll() is None
    with Wire(mta.port) as w:
        w.greet()
    assert os.path.exists(f"/proc/{pid}")
