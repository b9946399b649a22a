"""End-to-end throughput: N messages through `mtaq run` to an aiosmtpd sink on loopback.

Prints accepted msgs/s (every client has its 250) and delivered msgs/s (the sink has them all),
next to the baseline measured in the same run: the same load against the aiosmtpd sink itself.

    python -m bench.throughput --messages 5000 --concurrency 20 --workers 2
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.loadgen import run_load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=2000, help="octets per message")
    p.add_argument("--appendfsync", default="always", choices=["always", "everysec"])
    p.add_argument("--timeout", type=float, default=600.0, help="give up waiting for delivery after this")
    a = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mtaq-bench-"))
    sink_port, mtaq_port = free_port(), free_port()
    counter = tmp / "count"
    sink = subprocess.Popen([sys.executable, "-m", "bench.sink", "--port", str(sink_port),
                             "--count-file", str(counter)])
    mtaq: subprocess.Popen[bytes] | None = None
    try:
        wait_port(sink_port)
        print(f"baseline: {a.messages} messages, {a.concurrency} connections -> aiosmtpd sink", flush=True)
        base = run_load("127.0.0.1", sink_port, messages=a.messages, concurrency=a.concurrency, size=a.size)
        print(f"  aiosmtpd sink accepted {base.sent} ({base.failed} failed) in {base.seconds:.2f}s "
              f"= {base.rate:.0f} msgs/s", flush=True)
        time.sleep(0.5)
        already = count(counter)

        env = dict(os.environ, MTAQ_LOG_LEVEL="WARNING", MTAQ_HOSTNAME="bench.test")
        mtaq = subprocess.Popen([sys.executable, "-m", "common.cli", "run", "--data-dir", str(tmp / "var"),
                                 "--listen", f"127.0.0.1:{mtaq_port}", "--workers", str(a.workers),
                                 "--relayhost", f"[127.0.0.1]:{sink_port}",
                                 "--redis-appendfsync", a.appendfsync], env=env)
        wait_port(mtaq_port)
        print(f"mtaq run: {a.workers} workers, appendfsync {a.appendfsync}; sending {a.messages} messages",
              flush=True)
        t0 = time.perf_counter()
        acc = run_load("127.0.0.1", mtaq_port, messages=a.messages, concurrency=a.concurrency, size=a.size)
        print(f"  mtaq accepted {acc.sent} ({acc.failed} failed) in {acc.seconds:.2f}s = {acc.rate:.0f} msgs/s",
              flush=True)
        deadline = time.monotonic() + a.timeout
        last_print = 0.0
        while count(counter) - already < acc.sent and time.monotonic() < deadline:
            if time.monotonic() - last_print > 2:
                print(f"  delivered {count(counter) - already}/{acc.sent}", flush=True)
                last_print = time.monotonic()
            time.sleep(0.05)
        delivered = count(counter) - already
        elapsed = time.perf_counter() - t0
        print(f"  mtaq delivered {delivered} in {elapsed:.2f}s from the first connection "
              f"= {delivered / elapsed:.0f} msgs/s", flush=True)
        print()
        print(f"{'':24}{'msgs/s':>10}{'vs aiosmtpd sink':>20}")
        print(f"{'aiosmtpd sink (accept)':24}{base.rate:>10.0f}{1.0:>20.2f}")
        print(f"{'mtaq accepted':24}{acc.rate:>10.0f}{acc.rate / base.rate:>20.2f}")
        print(f"{'mtaq delivered':24}{delivered / elapsed:>10.0f}{delivered / elapsed / base.rate:>20.2f}")
    finally:
        for proc in (mtaq, sink):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
