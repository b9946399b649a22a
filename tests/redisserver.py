"""A real, private ``redis-server`` for integration and chaos tests: mtaq's own launcher
(mtaq/runtime/embedded.RedisProcess, the one `mtaq run` uses), on TCP.

Configured as production is (ARCHITECTURE.md, Redis rules): AOF on with ``appendfsync always``,
``maxmemory-policy noeviction``, no RDB snapshots, bound to 127.0.0.1 on a port of tests/ports.py, its
files in a temporary directory. ``stop()`` is a clean SIGTERM, ``kill()`` a crash (SIGKILL);
``start()`` again brings it back on the same port with the same directory, so a test can check
that what was acknowledged survived.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from types import TracebackType

from mtaq.runtime.embedded import RedisProcess, find_redis_server
from tests.ports import free_port

__all__ = ["RedisServer", "find_redis_server"]


class RedisServer(RedisProcess):
    """``with RedisServer(tmp_path / "redis") as rs: redis.Redis.from_url(rs.url)``.

    ``directory`` holds the AOF and the log (created if missing; a temporary directory, removed
    on exit, when None). ``maxmemory`` is Redis syntax (``"5mb"`` or bytes).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        maxmemory: str | int = "0",
        appendfsync: str = "always",
        host: str = "127.0.0.1",
        port: int | None = None,
        executable: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self._own_dir = directory is None
        super().__init__(
            directory if directory is not None else tempfile.mkdtemp(prefix="mtaq-redis-"),
            host=host,
            port=port if port is not None else free_port([host]),
            appendfsync=appendfsync,
            maxmemory=maxmemory,
            executable=executable,
        )
        self.startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float | None = None) -> None:
        """Start (or restart, same port and directory) and wait until it answers PING."""
        if not self.running:
            super().start(self.startup_timeout if timeout is None else timeout)

    def cleanup(self) -> None:
        """Stop, and remove the directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()
