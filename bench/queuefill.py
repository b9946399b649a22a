"""How the queue's monitoring scales with the queue (issue 16): fill a queue with no workers, then
time what an operator runs during an outage.

A private redis-server (mtaq/runtime/embedded.RedisProcess, on a unix socket in a temporary directory) is
filled straight through the product's own commit path (common/spool.py: message, envelope,
recipient states and delivery jobs in one MULTI/EXEC per batch, as the ingress commits them), not
through SMTP: a million messages in minutes. The queue grows step by step (20,000, 200,000, ...);
at each step every command is timed as an operator would run it, each bounded by ``--timeout``:

- ``mtaq queue stats`` (to exit),
- ``mtaq queue list --domain d7.test`` (to exit; output discarded),
- ``mtaq queue list`` (to its first line, then stopped),
- ``/metrics`` of ``mtaq exporter``, scraped twice ``--rescrape`` seconds apart (the second shows
  what a cache, if any, hides).

Appendfsync is ``no`` here: the fill is what it costs to get the queue, not what is measured.

    .venv/bin/python -m bench.queuefill --sizes 20000,200000 --domains 50 --body 2048
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from common.envelope import Envelope, Recipient, new_queue_id
from common.settings import Settings
from common.spool import Spool
from common.store import Message
from mtaq.runtime.embedded import RedisProcess

__all__ = ["Timing", "fill", "main", "messages", "table"]

ROOT = Path(__file__).resolve().parents[1]
BATCH = 500  # messages per commit (the ingress's group commits are 8-20; bigger fills faster)


def body(size: int) -> bytes:
    head = b"Subject: queued\r\nFrom: s@fill.test\r\n\r\n"
    return head + b"x" * max(0, size - len(head) - 2) + b"\r\n"


def messages(start: int, n: int, domains: int, payload: bytes) -> list[Message]:
    """Messages ``start`` .. ``start + n`` of the fill, one recipient each, round robin over domains
    d0.test .. d<domains-1>.test (so d7.test has 1/domains of the queue)."""
    return [
        Message(
            Envelope(id=new_queue_id(), sender="s@fill.test", recipients=[Recipient(f"u{i}@d{i % domains}.test")]),
            payload,
        )
        for i in range(start, start + n)
    ]


def fill(spool: Spool, start: int, n: int, domains: int, payload: bytes) -> float:
    """Commit ``n`` more messages; returns the seconds it took."""
    t0 = time.monotonic()
    for at in range(start, start + n, BATCH):
        spool.commit(messages(at, min(BATCH, start + n - at), domains, payload))
    return time.monotonic() - t0


@dataclass
class Timing:
    what: str
    seconds: float | None  # None: did not finish within the timeout

    def text(self, timeout: float) -> str:
        return f">{timeout:.0f} s" if self.seconds is None else f"{self.seconds:.2f} s"


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "MTAQ_REDIS_URL": url, "PYTHONPATH": str(ROOT)}


def run_to_exit(args: Sequence[str], url: str, timeout: float) -> float | None:
    t0 = time.monotonic()
    try:
        subprocess.run(
            [sys.executable, "-m", "mtaq", *args],
            env=_env(url),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - t0


def first_line(args: Sequence[str], url: str, timeout: float) -> float | None:
    """Seconds until the command printed its first line; it is stopped then."""
    t0 = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-m", "mtaq", *args], env=_env(url), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as p:
        assert p.stdout is not None
        os.set_blocking(p.stdout.fileno(), True)
        got: float | None = None
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            while time.monotonic() - t0 < timeout:
                if sel.select(timeout=max(0.0, timeout - (time.monotonic() - t0))):
                    if p.stdout.readline():
                        got = time.monotonic() - t0
                    break
        p.kill()
        p.wait()
    return got


@contextlib.contextmanager
def exporter(url: str, port: int) -> Iterator[str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "mtaq", "exporter", "--metrics-listen", f"127.0.0.1:{port}"],
        env=_env(url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(base + "/healthz", timeout=2):
                break
            time.sleep(0.2)
        yield base
    finally:
        p.terminate()
        p.wait(10)


def scrape(base: str, timeout: float) -> float | None:
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=timeout) as resp:
            resp.read()
    except TimeoutError:
        return None
    return time.monotonic() - t0


def measure(url: str, port: int, timeout: float, rescrape: float, domain: str) -> list[Timing]:
    out = [
        Timing("mtaq queue stats", run_to_exit(["queue", "stats"], url, timeout)),
        Timing(f"mtaq queue list --domain {domain}", run_to_exit(["queue", "list", "--domain", domain], url, timeout)),
        Timing("mtaq queue list (first line)", first_line(["queue", "list"], url, timeout)),
    ]
    with exporter(url, port) as base:
        out.append(Timing("/metrics", scrape(base, timeout)))
        time.sleep(rescrape)
        out.append(Timing(f"/metrics again {rescrape:g} s later", scrape(base, timeout)))
    return out


def table(sizes: Sequence[int], rows: dict[int, list[Timing]], timeout: float) -> str:
    names = [t.what for t in rows[sizes[0]]]
    head = "| | " + " | ".join(f"{n:,} queued" for n in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for i, name in enumerate(names):
        lines.append(f"| `{name}` | " + " | ".join(rows[n][i].text(timeout) for n in sizes) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.queuefill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20000,200000", help="queue sizes to measure at, ascending")
    ap.add_argument("--domains", type=int, default=50)
    ap.add_argument("--body", type=int, default=2048, help="message size in octets")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds each command may take")
    ap.add_argument("--rescrape", type=float, default=11.0, help="seconds between the two scrapes")
    ap.add_argument("--port", type=int, default=19125, help="the exporter's port on 127.0.0.1")
    a = ap.parse_args(argv)
    sizes = sorted(int(s) for s in a.sizes.split(","))
    payload = body(a.body)
    rows: dict[int, list[Timing]] = {}
    with tempfile.TemporaryDirectory(prefix="mtaq-queuefill-") as tmp:
        sock = str(Path(tmp) / "redis.sock")
        rp = RedisProcess(tmp, unixsocket=sock, appendfsync="no")
        rp.start()
        try:
            url = f"unix://{sock}"
            r = redis.Redis(unix_socket_path=sock)
            spool = Spool.from_settings(Settings().replace(redis_url=url), r)
            have = 0
            for n in sizes:
                took = fill(spool, have, n - have, a.domains, payload)
                have = n
                mem = int(r.info("memory")["used_memory"]) / 2**20
                print(f"{n:,} queued (+{took:.1f} s to fill, Redis {mem:,.0f} MiB)", flush=True)
                rows[n] = measure(url, a.port, a.timeout, a.rescrape, "d7.test")
                for t in rows[n]:
                    print(f"  {t.what}: {t.text(a.timeout)}", flush=True)
            r.close()
        finally:
            rp.stop()
    print(table(sizes, rows, a.timeout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
