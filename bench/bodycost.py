"""Where a message's CPU goes, process by process: ``mtaq run`` (embedded Redis with ``appendfsync
always``, as bench.throughput starts it) relaying to an smtp-sink, one smtp-source load (a new
connection per message), and the user and system CPU of the ingress, redis-server (with its AOF
rewrite children) and the workers per message, from /proc. Made for the 1 MiB load (issue 15):
CPU per message moves little with the machine's load, so it needs no bench lock; the msgs/s it
prints do (take rates from bench.throughput under the lock).

    python -m bench.bodycost                                  # 100 x 1 MiB, 10 sessions
    python -m bench.bodycost --messages 200 --perf /tmp/p.data   # and a perf profile of them all
"""

from __future__ import annotations

import argparse
import resource
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import measure
from bench.measure import CLK_TCK, parse_pss_kib, parse_times
from bench.profile import cmdline, trace_env, trace_summary
from bench.sinkdump import DumpSink
from bench.systems import Mtaq, free_port, stop_proc

ROLES = ("ingress", "worker")


def role(pid: int) -> str:
    argv = cmdline(pid)
    if any("redis-server" in a for a in argv):
        return "redis"
    return next((r for r in ROLES if r in argv), "run")


def ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks of a process and of its children it has reaped."""
    try:
        return parse_times(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return 0, 0


def tree(root: int) -> list[int]:
    return list(measure.tree([root]))


def snapshot(root: int) -> dict[str, tuple[int, int]]:
    """(user, system) ticks by role, summed over the live tree (dead children are in their
    parents' reaped fields)."""
    by: dict[str, tuple[int, int]] = {}
    for pid in tree(root):
        r = role(pid)
        u, s = by.get(r, (0, 0))
        du, ds = ticks(pid)
        by[r] = (u + du, s + ds)
    return by


def smtp_source(port: int, messages: int, size: int, sessions: int, timeout: float) -> None:
    argv = ["smtp-source", "-N", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    argv += ["-M", "smtp-source.test", "-f", "load@loadgen.test", "-t", "u@example.test", f"127.0.0.1:{port}"]
    subprocess.run(argv, check=True, timeout=timeout)


def wait_delivered(sink: DumpSink, messages: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sink.files()
        if len(files) >= messages and all(f.stat().st_size > 0 for f in files):
            return
        time.sleep(0.05)
    raise SystemExit(f"not all {messages} messages reached the sink within {timeout:g} s")


class PeakPss:
    """Peak PSS (MiB) of each role, sampled every ``interval`` s in a thread."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root, self.interval = root, interval
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now: dict[str, float] = {}
            for pid in tree(self.root):
                try:
                    kib = parse_pss_kib(Path(f"/proc/{pid}/smaps_rollup").read_text())
                except OSError:
                    continue
                r = role(pid)
                now[r] = now.get(r, 0.0) + kib / 1024
            now["all"] = sum(now.values())
            for r, mib in now.items():
                self.peak[r] = max(self.peak.get(r, 0.0), mib)

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def redis_info(sock: Path) -> dict[str, Any]:
    import redis

    r = redis.Redis(unix_socket_path=str(sock))
    try:
        return {**r.info("stats"), **r.info("persistence"), **r.info("cpu")}
    finally:
        r.close()


def machine_busy() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / CLK_TCK, sum(fields) / CLK_TCK


def report(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], n: int) -> None:
    print(f"  {'process':8} {'user':>6} {'system':>6} {'ms/msg':>6}")
    tu = ts = 0.0
    for r in sorted(after):
        bu, bs = before.get(r, (0, 0))
        u = (after[r][0] - bu) / CLK_TCK * 1000 / n
        s = (after[r][1] - bs) / CLK_TCK * 1000 / n
        tu, ts = tu + u, ts + s
        print(f"  {r:8} {u:6.2f} {s:6.2f} {u + s:6.2f}")
    print(f"  {'total':8} {tu:6.2f} {ts:6.2f} {tu + ts:6.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1048576, help="octets per message (1 MiB)")
    ap.add_argument("--messages", type=int, default=100)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--mtaq", type=Path, default=Path(".venv/bin/mtaq"), help="the mtaq executable")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--perf", type=Path, default=None, help="perf record -g every mtaq process into this file")
    ap.add_argument("--trace", type=Path, default=None, help="group commits and jobs (bench/trace) into this directory")
    a = ap.parse_args(argv)
    n = a.messages
    with tempfile.TemporaryDirectory(prefix="bodycost") as d:
        base = Path(d)
        port = free_port()
        with DumpSink(base / "sink", "127.0.0.1", port) as sink:
            env = trace_env(a.trace) if a.trace is not None else None
            system = Mtaq(a.mtaq.absolute(), base / "mtaq", relayhost=f"[127.0.0.1]:{port}", extra_env=env)
            system.start()
            perf: subprocess.Popen[bytes] | None = None
            try:
                assert system.proc is not None
                root = system.proc.pid
                time.sleep(1.0)  # the workers up
                if a.perf is not None:
                    pids = ",".join(str(p) for p in tree(root))
                    argv = ["perf", "record", "-F", "1999", "-g", "-p", pids, "-o", str(a.perf)]
                    perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1.0)
                before = snapshot(root)
                busy0 = machine_busy()
                outside0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                sink0 = sum(ticks(sink.proc.pid)) if sink.proc is not None else 0
                t0 = time.perf_counter()
                with PeakPss(root) as pss:
                    smtp_source(system.port, n, a.size, a.sessions, a.timeout)
                    t_in = time.perf_counter() - t0
                    wait_delivered(sink, n, a.timeout)
                    t_e2e = time.perf_counter() - t0
                time.sleep(0.5)  # the last outcomes written
                after = snapshot(root)
                info = redis_info(base / "mtaq" / "var" / "redis.sock")
                busy1 = machine_busy()
                outside1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                sink1 = sum(ticks(sink.proc.pid)) if sink.proc is not None else 0
            finally:
                stop_proc(perf, 30, signal.SIGINT)
                system.stop()
    print(f"{n} x {a.size} B, {a.sessions} sessions: ingress {n / t_in:.1f} msgs/s, e2e {n / t_e2e:.1f} msgs/s")
    report(before, after, n)
    source = outside1.ru_utime + outside1.ru_stime - outside0.ru_utime - outside0.ru_stime
    print(f"  smtp-source {source * 1000 / n:.2f} ms/msg, smtp-sink {(sink1 - sink0) / CLK_TCK * 1000 / n:.2f} ms/msg")
    children = info["used_cpu_sys_children"] + info["used_cpu_user_children"]
    print(
        f"  redis: {info['total_forks']} forks (AOF rewrites), their CPU {children * 1000:.0f} ms in all, "
        f"last copy-on-write {info.get('aof_last_cow_size', 0) / 2**20:.1f} MiB"
    )
    print("  peak PSS MiB: " + ", ".join(f"{r} {mib:.0f}" for r, mib in sorted(pss.peak.items())))
    busy, total = busy1[0] - busy0[0], busy1[1] - busy0[1]
    print(f"  the machine: {busy * 1000 / n:.2f} ms/msg busy, {busy / total:.0%} of its CPUs busy")
    if a.trace is not None:
        trace_summary(a.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
