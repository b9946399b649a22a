"""`mtaq run`: the all-in-one with its embedded redis-server, as a newcomer starts it."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.dnsserver import ZoneServer
from tests.integration.conftest import ROOT, message, wait_port
from tests.sinks import SinkServer, free_port, wait_for


def start_run(data_dir: Path, port: int, dns: ZoneServer, mx_port: int, log: Path, workers: int
              ) -> subprocess.Popen[bytes]:
    env = dict(os.environ, MTAQ_DNS_SERVERS=f"127.0.0.1:{dns.port}", MTAQ_SMTP_PORT=str(mx_port),
               MTAQ_HOSTNAME="mtaq.test", MTAQ_LOG_LEVEL="INFO")
    with open(log, "ab") as out:
        p = subprocess.Popen([sys.executable, "-m", "common.cli", "run", "--data-dir", str(data_dir),
                              "--listen", f"127.0.0.1:{port}", "--workers", str(workers)],
                             env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    wait_port("127.0.0.1", port)
    return p


def queue_listing(data_dir: Path) -> str:
    return subprocess.run([sys.executable, "-m", "common.cli", "queue", "--data-dir", str(data_dir)], cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=30).stdout


def test_run_keeps_the_queue_across_restarts_and_delivers(tmp_path: Path, dns: ZoneServer, mx_port: int,
                                                          sinks: Callable[..., SinkServer]) -> None:
    dns.add("a.test.", "MX", "10 mx.a.test.")
    dns.add("mx.a.test.", "A", "127.0.0.2")
    data_dir, log, port = tmp_path / "var", tmp_path / "run.log", free_port()
    # first start: no worker, so the message stays queued
    p = start_run(data_dir, port, dns, mx_port, log, workers=0)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            code, resp = s.ehlo("client.test")
            assert code == 250 and b"PIPELINING" in resp
            s.sendmail("alice@client.test", ["bob@a.test"], message("kept"))
        listing = queue_listing(data_dir)  # another command finds the embedded Redis via data_dir
        assert "alice@client.test" in listing and "bob@a.test" in listing and "1 Request." in listing
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0, log.read_text()
    assert not (data_dir / "redis.sock").exists() or "redis-server stopped" in log.read_text()
    assert (data_dir / "appendonly.aof").stat().st_size > 0 or (data_dir / "appendonlydir").exists()
    # nothing left running: no redis-server and no child holds the port
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
        probe.bind(("127.0.0.1", port))

    box = sinks("127.0.0.2")
    p = start_run(data_dir, port, dns, mx_port, log, workers=1)
    try:
        assert wait_for(lambda: box.messages, 30), log.read_text()
        assert b"Subject: kept" in box.messages[0][2]
        assert wait_for(lambda: "Mail queue is empty" in queue_listing(data_dir), 10)
    finally:
        p.send_signal(signal.SIGINT)  # Ctrl-C
        assert p.wait(60) == 0, log.read_text()
    assert "status=sent" in log.read_text()
