"""`mtaq run`, the all-in-one, as a process the tests start and stop as a newcomer does, and
`mtaq queue` beside it (it finds the embedded Redis through the data directory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.dnsserver import ZoneServer
from tests.fixtures import ROOT
from tests.ports import wait_port

__all__ = ["queue_listing", "start_run", "stop"]


def start_run(
    data_dir: Path, port: int, dns: ZoneServer, mx_port: int, log: Path, workers: int
) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        MTAQ_DNS_SERVERS=f"127.0.0.1:{dns.port}",
        MTAQ_SMTP_PORT=str(mx_port),
        MTAQ_HOSTNAME="mtaq.test",
        MTAQ_LOG_LEVEL="INFO",
    )
    # its own session, as a shell starts a foreground job in its own process group: the test can then
    # signal the whole group as a terminal's Ctrl-C does
    with open(log, "ab") as out:
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mtaq",
                "run",
                "--data-dir",
                str(data_dir),
                "--listen",
                f"127.0.0.1:{port}",
                "--workers",
                str(workers),
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_port("127.0.0.1", port)
    return p


def queue_listing(data_dir: Path) -> str:
    return subprocess.run(
        [sys.executable, "-m", "mtaq", "queue", "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def stop(p: subprocess.Popen[bytes], log: Path) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0, log.read_text()
