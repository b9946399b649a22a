"""The systems under test, each started fresh for one load and stopped after it, with the root pids
whose process trees bench/measure.py accounts.

- ``Mtaq``: ``mtaq run`` from any checkout (``--mtaq PATH`` to its ``mtaq`` executable; settings
  go by MTAQ_* environment variables, which every `mtaq` command reads, so the harness does not
  depend on one branch's flag spelling).
- ``Postfix``: bench/postfix.py's private instance (defaults), relaying to the sink.
- ``AcceptOnly``: bench/sink.py, aiosmtpd accepting and discarding: the reference for what an
  asyncio SMTP server costs with nothing behind it. It delivers nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from bench import postfix

__all__ = ["AcceptOnly", "Mtaq", "Postfix", "System", "free_port", "stop_proc", "wait_port"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 60.0, host: str = "127.0.0.1", proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Until something accepts on host:port; gives up early when ``proc`` (the server) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening on {host}:{port}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


class System(Protocol):
    name: str
    delivers: bool
    port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def roots(self) -> list[int]: ...
    def log_tail(self) -> str: ...


def stop_proc(proc: subprocess.Popen[bytes] | None, timeout: float = 60, sig: int = signal.SIGTERM) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Mtaq:
    """``mtaq run`` on 127.0.0.1:port with its embedded Redis in ``base``. ``relayhost`` sends all
    mail to the sink; without it the workers resolve MX through ``dns_servers``."""

    delivers = True

    def __init__(
        self,
        exe: Path,
        base: Path,
        *,
        workers: int | None = None,
        relayhost: str = "",
        dns_servers: str = "",
        smtp_port: int = 25,
        extra_env: dict[str, str] | None = None,
        name: str = "",
    ) -> None:
        self.exe = exe
        self.base = base
        self.port = free_port()
        self.name = name or ("mtaq" if workers is None else f"mtaq --workers {workers}")
        # log level stays the default (INFO, a line per delivery), as Postfix logs every delivery too
        env = dict(os.environ, MTAQ_HOSTNAME="mtaq-bench.test")
        env.update(
            MTAQ_LISTEN=f"127.0.0.1:{self.port}",
            MTAQ_DATA_DIR=str(base / "var"),
            MTAQ_REDIS_APPENDFSYNC="always",  # 250 means on disk, as Postfix's fsync before 250
        )
        if workers is not None:
            env["MTAQ_WORKERS"] = str(workers)
        if relayhost:
            env["MTAQ_RELAYHOST"] = relayhost
        if dns_servers:
            env.update(MTAQ_DNS_SERVERS=dns_servers, MTAQ_SMTP_PORT=str(smtp_port))
        env.update(extra_env or {})
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "mtaq.log"

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            # cwd: its own directory, never the harness's checkout, whose packages `python -m`
            # children would otherwise import ahead of the other checkout's
            self.proc = subprocess.Popen(
                [str(self.exe), "run"], env=self.env, cwd=self.base, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        try:
            wait_port(self.port, proc=self.proc)
            self._wait_workers()
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{self.name}: {e}\n{self.log_tail()}") from None

    def _wait_workers(self, timeout: float = 30.0) -> None:
        """Until every worker has registered with RQ (``rq:workers`` in the embedded Redis): the load
        measures a running MTA, as Postfix's queue manager runs once its port answers (the ingress
        answered 0.5-1 s before the workers had imported their code: bench.slowdest's first
        messages waited for them)."""
        import redis  # the harness's own (the system under test may be another checkout)

        want = int(self.env.get("MTAQ_WORKERS", "2"))
        sock = self.base / "var" / "redis.sock"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sock.exists():
                try:
                    with redis.Redis(unix_socket_path=str(sock), socket_timeout=2) as r:
                        if int(r.scard("rq:workers")) >= want:
                            return
                except redis.RedisError:
                    pass  # still starting
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("exited before its workers started")
            time.sleep(0.05)
        raise RuntimeError(f"its {want} workers did not register within {timeout:.0f}s")

    def stop(self) -> None:
        stop_proc(self.proc)

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class Postfix:
    """Postfix with its defaults on 127.0.0.1:port: relayhost to the sink, or ``transports``
    (domain -> nexthop) for the slow-destination load."""

    name = "postfix"
    delivers = True

    def __init__(self, base: Path, *, relay_port: int = 0, transports: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.inst = postfix.PostfixInstance(base, self.port, relay_port, transports=transports)

    def start(self) -> None:
        self.inst.start()
        wait_port(self.port)
        deadline = time.monotonic() + 10  # master(8) writes its pid file once it has daemonised
        while self.inst.master_pid() is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.inst.stop()

    def roots(self) -> list[int]:
        pid = self.inst.master_pid()
        return [pid] if pid else []

    def log_tail(self) -> str:
        return self.inst.log_tail(10)


class AcceptOnly:
    """aiosmtpd accepting and discarding (bench/sink.py)."""

    name = "aiosmtpd sink"
    delivers = False

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.sink", "--port", str(self.port), "--count-file", str(self.base / "count")],
            cwd=Path(__file__).resolve().parent.parent,
        )
        wait_port(self.port, proc=self.proc)

    def stop(self) -> None:
        stop_proc(self.proc)

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def log_tail(self) -> str:
        return ""
