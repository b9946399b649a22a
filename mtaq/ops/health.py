"""`mtaq health`: is this deployment able to take and deliver mail right now?

Checks, each one line when it fails: Redis answers PING; the ingress port greets with 220; at least
one worker's heartbeat is fresh; (optionally) the metrics listener answers. Compose healthchecks
run a subset per service (a worker container does not need the ingress to be up to be healthy)."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import redis

from common.replication import primary_address, read_replication
from common.settings import Settings
from common.smtp.hostport import parse_hostport

__all__ = ["CHECKS", "Check", "check_ingress", "check_metrics", "check_redis", "check_workers", "run_checks"]

CHECKS = ("redis", "ingress", "worker", "metrics")
DEFAULT_CHECKS = ("redis", "ingress", "worker")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.name}: {'ok' if self.ok else 'FAILED'}: {self.detail}"

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _local(host: str) -> str:
    """Where to reach a listener bound to ``host`` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def check_redis(r: redis.Redis) -> Check:
    try:
        r.ping()
        view = read_replication(r, primary_address(r), time.time())
    except (redis.RedisError, OSError) as e:
        return Check(
            "redis", False, f"no answer ({e}); is redis-server running and redis_url (or redis_sentinels) right?"
        )
    # "PONG; 10.0.0.5:6379 is master with 1 replica(s) online": which host is primary, and its replicas
    line = "PONG; " + view.lines()[0].removeprefix("redis: ")
    if view.fenced:  # the ha set-up's fence (docs/high-availability.md): up, but nothing is written
        return Check("redis", False, line + "; bring a replica back (Sentinel resyncs an old primary)")
    return Check("redis", True, line)


def check_ingress(listen: str, timeout: float = 5.0) -> Check:
    host, port = parse_hostport(listen, 25)
    host = _local(host)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            greeting = b""
            while b"\n" not in greeting and len(greeting) < 1024:
                chunk = s.recv(1024)
                if not chunk:
                    break
                greeting += chunk
            with_quit = greeting.startswith(b"220")
            if with_quit:
                s.sendall(b"QUIT\r\n")
    except OSError as e:
        return Check("ingress", False, f"[{host}]:{port}: {e}; is `mtaq ingress` running on listen={listen}?")
    first = greeting.split(b"\r\n", 1)[0].decode("utf-8", "replace")[:120]
    if not with_quit:
        return Check("ingress", False, f"[{host}]:{port} greeted {first!r}, not 220")
    return Check("ingress", True, f"[{host}]:{port} {first}")


def check_workers(list_workers: Callable[[], Sequence[object]]) -> Check:
    try:
        alive = list_workers()
    except (redis.RedisError, OSError) as e:
        return Check("worker", False, f"cannot read worker heartbeats: {e}")
    if not alive:
        return Check("worker", False, "no worker heartbeat in the last 90s; start `mtaq worker`")
    return Check("worker", True, f"{len(alive)} worker(s) alive")


def check_metrics(listen: str, timeout: float = 5.0) -> Check:
    if not listen:
        return Check("metrics", False, "metrics_listen is unset")
    host, port = parse_hostport(listen, 9125)
    host = _local(host)
    url = f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except OSError as e:
        return Check("metrics", False, f"{url}: {e}")
    if b"mtaq_redis_up 1.0" not in body:
        return Check("metrics", False, f"{url} answers but cannot read Redis")
    return Check("metrics", True, url)


def run_checks(
    settings: Settings,
    r: redis.Redis,
    list_workers: Callable[[], Sequence[object]],
    checks: Sequence[str] = DEFAULT_CHECKS,
    *,
    hostname_problem: str | None = None,
) -> list[Check]:
    out: list[Check] = []
    if "redis" in checks:
        out.append(check_redis(r))
    redis_ok = all(c.ok for c in out)
    if "ingress" in checks:
        out.append(check_ingress(settings.listen))
    if "worker" in checks:
        out.append(
            check_workers(list_workers) if redis_ok else Check("worker", False, "unknown: Redis does not answer")
        )
    if "metrics" in checks:
        out.append(check_metrics(settings.metrics_listen))
    if hostname_problem:
        # a warning, not a failure: mail flows, but remote servers may refuse our greeting name
        out.append(Check("hostname", True, f"warning: {hostname_problem}"))
    return out
