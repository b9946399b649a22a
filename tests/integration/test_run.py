"""`mtaq run`: the all-in-one with its embedded redis-server, as a newcomer starts it."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
from collections.abc import Callable
from pathlib import Path

import redis

from common.store import INDEX, LAYOUT_KEY, msg_key
from tests.dnsserver import ZoneServer
from tests.fixtures import message
from tests.integration.eventually import GENEROUS, eventually
from tests.integration.smtpwire import Wire
from tests.mtaqrun import queue_listing, start_run, stop
from tests.ports import free_port
from tests.procs import alive, children, refused
from tests.sinks import SinkServer, wait_for


def test_run_keeps_the_queue_across_restarts_and_delivers(
    tmp_path: Path, dns: ZoneServer, mx_port: int, sinks: Callable[..., SinkServer]
) -> None:
    dns.add("a.test.", "MX", "10 mx.a.test.")
    dns.add("mx.a.test.", "A", "127.0.0.2")
    data_dir, log, port = tmp_path / "var", tmp_path / "run.log", free_port()
    # first start: no worker, so the message stays queued
    p = start_run(data_dir, port, dns, mx_port, log, workers=0)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=GENEROUS) as s:
            code, resp = s.ehlo("client.test")
            assert code == 250 and b"PIPELINING" in resp
            s.sendmail("alice@client.test", ["bob@a.test"], message("kept"))
        # `mtaq run` opens the layout gate itself (its Redis is its own): one key a message, no worker yet
        with redis.Redis(unix_socket_path=str(data_dir / "redis.sock")) as r:
            assert r.get(LAYOUT_KEY) == b"2" and r.hget(msg_key(r.zrange(INDEX, 0, 0)[0].decode()), "v") == b"2"
        listing = queue_listing(data_dir)  # another command finds the embedded Redis via data_dir
        assert "alice@client.test" in listing and "bob@a.test" in listing and "1 Request." in listing
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0, log.read_text()
    assert not (data_dir / "redis.sock").exists() or "redis-server stopped" in log.read_text()
    # Redis 6 writes one file, Redis 7 a directory of them (a redis-server on PATH is used first)
    aof = data_dir / "appendonly.aof"
    assert (aof.exists() and aof.stat().st_size > 0) or any((data_dir / "appendonlydir").glob("*.aof"))
    # nothing left running: no redis-server and no child holds the port
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
        probe.bind(("127.0.0.1", port))

    box = sinks("127.0.0.2")
    p = start_run(data_dir, port, dns, mx_port, log, workers=1)
    try:
        assert wait_for(lambda: box.messages, GENEROUS), log.read_text()
        assert b"Subject: kept" in box.messages[0][2]
        eventually(lambda: "Mail queue is empty" in queue_listing(data_dir), "an empty queue")
    finally:
        p.send_signal(signal.SIGINT)  # Ctrl-C
        assert p.wait(60) == 0, log.read_text()
    assert "status=sent" in log.read_text()


def test_ctrl_c_lets_the_transaction_in_flight_finish_before_redis_stops(
    tmp_path: Path, dns: ZoneServer, mx_port: int
) -> None:
    data_dir, log, port = tmp_path / "var", tmp_path / "run.log", free_port()
    p = start_run(data_dir, port, dns, mx_port, log, workers=0)
    try:
        busy = Wire(port, timeout=GENEROUS)
        busy.greet()
        assert busy.cmd("MAIL FROM:<alice@client.test>").status == (250, "2.1.0")
        assert busy.cmd("RCPT TO:<bob@a.test>").status == (250, "2.1.5")
        assert busy.cmd("DATA").code == 354
        busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: the terminal signals its whole foreground process group
        assert wait_for(lambda: refused(port), GENEROUS), log.read_text()  # the ingress is shutting down
        # The Ctrl-C cannot reach redis-server or the ingress: each runs in a session of its own, so
        # only the supervisor got the signal and it stops them in order. This replaces a guessed
        # sleep that gave a signalled redis-server time to die before the commit below.
        group = os.getpgid(p.pid)
        for child in (int((data_dir / "redis.pid").read_text()), *children(p.pid)):
            try:
                assert os.getpgid(child) != group, f"pid {child} is in the foreground group"
            except ProcessLookupError:  # gone: a redis-server killed by the signal fails the 250 below
                continue
        busy.send(b"second half\r\n")
        done = busy.cmd(".")
        assert done.status == (250, "2.0.0"), (str(done), log.read_text())  # not 451: Redis is still up
        assert busy.reply().status == (421, "4.3.2")
        busy.close()
        assert p.wait(60) == 0, log.read_text()
    finally:
        stop(p, log)
    qid = done.text.rsplit(" ", 1)[-1]
    text = log.read_text()
    assert text.index("ingress stopped") < text.index("redis-server stopped"), text

    p = start_run(data_dir, port, dns, mx_port, log, workers=0)
    try:
        listing = queue_listing(data_dir)
        assert qid in listing and "bob@a.test" in listing and "1 Request." in listing, listing
    finally:
        stop(p, log)


def test_run_restarts_a_killed_redis_server(tmp_path: Path, dns: ZoneServer, mx_port: int) -> None:
    data_dir, log, port = tmp_path / "var", tmp_path / "run.log", free_port()
    p = start_run(data_dir, port, dns, mx_port, log, workers=0)
    pid_file = data_dir / "redis.pid"
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=GENEROUS) as s:
            s.sendmail("alice@client.test", ["bob@a.test"], message("before"))
        old = int(pid_file.read_text())
        os.kill(old, signal.SIGKILL)

        def restarted() -> bool:
            try:
                pid = int(pid_file.read_text())
            except (FileNotFoundError, ValueError):
                return False
            return pid != old and alive(pid)

        assert wait_for(restarted, GENEROUS), log.read_text()
        new = int(pid_file.read_text())

        def accepted() -> bool:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=GENEROUS) as s:
                    s.sendmail("carol@client.test", ["dave@a.test"], message("after"))
            except (smtplib.SMTPException, OSError):
                return False
            return True

        assert wait_for(accepted, GENEROUS, interval=0.2), log.read_text()
        listing = queue_listing(data_dir)
        # the message accepted before the kill survived it (AOF, appendfsync always)
        assert "bob@a.test" in listing and "dave@a.test" in listing and "2 Requests." in listing, listing
        assert f"redis-server (pid {old}) exited with -9" in log.read_text()
    finally:
        stop(p, log)
    assert not alive(new)  # stopped with the rest: no redis-server left behind
