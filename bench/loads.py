"""The loads a benchmark sends, each bounded by a message count and a timeout.

- ``smtp_source``: Postfix's smtp-source, the tool people benchmark MTAs with. One transaction per
  connection by default (a new TCP connection, greeting and EHLO per message), or ``reuse=True``
  (``-d``: the next message over the same connection). ``-N`` numbers the recipients so that no
  cache sees the same address twice.
- ``generator``: our own (bench/loadgen.py) for what smtp-source cannot do.
- ``Probe``: smtp-source's messages carry no fine timestamp (their Date: has whole seconds), so
  latency under an smtp-source load is measured on probe messages sent beside it, on one more
  connection, one every ``interval`` seconds, each stamped ``X-Bench-Sent``. They travel through
  the same system to the same sink; they are left out of the rates.
"""

from __future__ import annotations

import contextlib
import os
import smtplib
import subprocess
import threading
import time
from dataclasses import dataclass, field

from bench.loadgen import LoadResult, run_load

__all__ = ["Load", "Probe", "generator", "smtp_source"]


@dataclass(frozen=True)
class Load:
    """What to send: ``kind`` is "smtp-source", "smtp-source -d" or "generator"."""

    kind: str
    messages: int
    sessions: int
    size: int
    recipients: int = 1
    domains: tuple[str, ...] = ("sink.test",)
    per_connection: int = 100  # generator only
    timeout: float = 600.0

    @property
    def probed(self) -> bool:
        return self.kind.startswith("smtp-source")


@dataclass
class Progress:
    sent: int = 0
    failed: int = 0
    started: float = field(default_factory=time.time)


def smtp_source(host: str, port: int, load: Load, progress: Progress) -> LoadResult:
    """Run smtp-source; ``progress.sent`` follows its -c counter (one count per completed DATA)."""
    argv = [
        "smtp-source",
        "-c",
        "-N",
        *(["-d"] if load.kind.endswith("-d") else []),
        "-s",
        str(load.sessions),
        "-m",
        str(load.messages),
        "-l",
        str(load.size),
        "-r",
        str(load.recipients),
        "-M",
        "smtp-source.test",
        "-f",
        "load@loadgen.test",
        "-t",
        f"u@{load.domains[0]}",
        f"{host}:{port}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    timer = threading.Timer(load.timeout, proc.kill)  # bounded even if the server stalls
    timer.start()
    try:
        buf = b""
        while chunk := os.read(proc.stdout.fileno(), 4096):  # "1\r2\r3\r..."
            buf += chunk
            *done, buf = buf.split(b"\r")
            if done and done[-1].strip().isdigit():
                progress.sent = int(done[-1])
        err = proc.stderr.read().decode(errors="replace").strip()
        rc = proc.wait()
    finally:
        timer.cancel()
    seconds = time.perf_counter() - t0
    if buf.strip().isdigit():
        progress.sent = int(buf)
    if rc != 0:
        # smtp-source gives up at its first error ("fatal: ..."): what it sent still counts
        print(f"\n  smtp-source exited {rc}: {err.splitlines()[-1] if err else '(no message)'}", flush=True)
    return LoadResult(progress.sent, load.messages - progress.sent, seconds)


def generator(host: str, port: int, load: Load, progress: Progress) -> LoadResult:
    counts = [0, 0]

    def follow() -> None:
        while not stop.wait(0.2):
            progress.sent, progress.failed = counts

    stop = threading.Event()
    t = threading.Thread(target=follow, daemon=True)
    t.start()
    try:
        return run_load(
            host,
            port,
            messages=load.messages,
            concurrency=load.sessions,
            size=load.size,
            rcpt_domains=list(load.domains),
            recipients=load.recipients,
            per_connection=load.per_connection,
            result=counts,
        )
    finally:
        stop.set()
        t.join()
        progress.sent, progress.failed = counts


class Probe:
    """One connection sending a stamped message every ``interval`` s until stopped (see above)."""

    def __init__(self, host: str, port: int, *, size: int, interval: float = 0.05, domain: str = "sink.test") -> None:
        self.host, self.port = host, port
        self.interval = interval
        self.domain = domain
        line = "x" * 76 + "\r\n"
        self.body = "Subject: probe\r\nFrom: probe@loadgen.test\r\n\r\n" + line * max(1, size // len(line))
        self.sent = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-probe", daemon=True)

    def _run(self) -> None:
        smtp: smtplib.SMTP | None = None
        while not self._stop.wait(self.interval):
            try:
                if smtp is None:
                    smtp = smtplib.SMTP(self.host, self.port, local_hostname="probe.test", timeout=30)
                msg = f"X-Bench-Sent: {time.time_ns()}\r\n{self.body}"
                smtp.sendmail("probe@loadgen.test", [f"probe{self.sent}@{self.domain}"], msg)
                self.sent += 1
            except (smtplib.SMTPException, OSError):
                self.errors += 1
                if smtp is not None:
                    with contextlib.suppress(smtplib.SMTPException, OSError):
                        smtp.close()
                smtp = None
        if smtp is not None:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
