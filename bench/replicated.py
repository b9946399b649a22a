"""mtaq with a replicated Redis, for the cost of ``redis_min_replicas`` (docs/high-availability.md):
a primary and a replica (both production-configured: AOF, fsync always, noeviction) on loopback TCP,
and `mtaq run` pointed at the primary by URL. ``min_replicas`` 0 and 1 run the same processes on
the same two Redis servers, so the only difference in a run is the WAIT after each commit."""

from __future__ import annotations

from pathlib import Path

from bench.systems import Mtaq, free_port
from mtaq.runtime.embedded import RedisProcess

__all__ = ["ReplicatedMtaq"]


class _Replica(RedisProcess):
    def __init__(self, directory: Path, port: int, primary_port: int) -> None:
        super().__init__(directory, port=port)
        self.primary_port = primary_port

    def config(self) -> str:
        return super().config() + f"replicaof 127.0.0.1 {self.primary_port}\n"


class ReplicatedMtaq(Mtaq):
    """``mtaq run`` against a primary with one replica; ``min_replicas`` is redis_min_replicas."""

    def __init__(self, exe: Path, base: Path, *, min_replicas: int, relayhost: str) -> None:
        primary_port = free_port()
        self.primary = RedisProcess(base / "redis-primary", port=primary_port)
        self.replica = _Replica(base / "redis-replica", free_port(), primary_port)
        super().__init__(
            exe,
            base,
            relayhost=relayhost,
            extra_env={
                "MTAQ_REDIS_URL": f"redis://127.0.0.1:{primary_port}/0",
                "MTAQ_REDIS_MIN_REPLICAS": str(min_replicas),
            },
            name=f"mtaq replica, min_replicas={min_replicas}",
        )

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        super().start()

    def stop(self) -> None:
        super().stop()
        self.replica.stop()
        self.primary.stop()

    def roots(self) -> list[int]:
        # the Redis servers are part of what mtaq costs, as the embedded one is in `mtaq run`
        return super().roots() + [p for p in (self.primary.pid, self.replica.pid) if p is not None]
