"""End-to-end throughput: N messages through `mtaq run` to an aiosmtpd sink on loopback.

Prints accepted msgs/s (every client has its 250) and delivered msgs/s (the sink has them all),
next to the baselines measured in the same run with the same load generator:

- the aiosmtpd sink itself (accepting mail, storing nothing; it is also the remote MX);
- with --postfix, when Postfix is installed: Postfix's smtp-sink (a C sink) and a private Postfix
  instance relaying to the same aiosmtpd sink (see bench/postfix.py).

    python -m bench.throughput --messages 5000 --concurrency 20 --workers 2
    python -m bench.throughput --postfix --appendfsync everysec --workers 4

Instrumentation of the mtaq run (the project is not changed):
    --trace DIR     messages per group commit and per delivery job (bench/trace/sitecustomize.py)
    --py-spy DIR    py-spy sampling profiles of the ingress and every worker (needs py-spy in PATH
                    or next to the interpreter), summarised at the end (bench/pyspy_summary.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import run_load

BENCH = Path(__file__).resolve().parent


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


@dataclass
class Row:
    name: str
    kind: str  # "accept" | "deliver"
    rate: float
    detail: str = ""


def wait_delivered(label: str, counter: Path, already: int, target: int, t0: float, timeout: float) -> float:
    """Wait until the sink has ``target`` more messages; delivered msgs/s from t0 (the first connection)."""
    deadline = time.monotonic() + timeout
    last_print = time.monotonic()
    while count(counter) - already < target and time.monotonic() < deadline:
        if time.monotonic() - last_print > 2:
            print(f"  delivered {count(counter) - already}/{target}", flush=True)
            last_print = time.monotonic()
        time.sleep(0.02)
    delivered = count(counter) - already
    elapsed = time.perf_counter() - t0
    note = "" if delivered >= target else f" (TIMED OUT after {timeout:.0f}s)"
    print(
        f"  {label} delivered {delivered} in {elapsed:.2f}s from the first connection "
        f"= {delivered / elapsed:.0f} msgs/s{note}",
        flush=True,
    )
    return delivered / elapsed


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(x) for x in (task / "children").read_text().split()]
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def py_spy_exe() -> str | None:
    near = Path(sys.executable).parent / "py-spy"
    return str(near) if near.exists() else shutil.which("py-spy")


def start_profilers(
    run_pid: int,
    out: Path,
    expect: int,
    *,
    wall: bool = False,
) -> list[tuple[str, subprocess.Popen[bytes]]]:
    exe = py_spy_exe()
    if exe is None:
        print("  --py-spy: py-spy not found (pip install py-spy); not profiling", flush=True)
        return []
    deadline = time.monotonic() + 20
    roles: dict[int, str] = {}
    while time.monotonic() < deadline:
        roles = {}
        for pid in children(run_pid):
            argv = cmdline(pid)
            for role in ("ingress", "worker"):
                if role in argv:
                    roles[pid] = role
        if len(roles) >= expect:
            break
        time.sleep(0.1)
    out.mkdir(parents=True, exist_ok=True)
    profs = []
    for pid, role in sorted(roles.items(), key=lambda x: x[1]):
        name = f"{role}-{pid}"
        p = subprocess.Popen(
            [
                exe,
                "record",
                "--nonblocking",
                "--rate",
                "200",
                "--format",
                "raw",
                "--pid",
                str(pid),
                *(["--idle"] if wall else []),
                "-o",
                str(out / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        profs.append((name, p))
    time.sleep(1.0)  # py-spy attaches
    print(f"  py-spy recording {', '.join(n for n, _ in profs)} -> {out}", flush=True)
    return profs


def trace_summary(trace_dir: Path) -> None:
    commits: list[int] = []
    jobs: dict[str, list[dict[str, float]]] = {}
    worker_commits = 0
    for f in sorted(trace_dir.glob("*.jsonl")):
        recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        role = f.stem.split("-")[0]
        for r in recs:
            if r["ev"] == "commit" and role == "ingress":
                commits.append(int(r["n"]))
            elif r["ev"] == "commit":
                worker_commits += 1
            elif r["ev"] == "job":
                jobs.setdefault(f.stem, []).append(r)
    print("\ntrace (bench/trace/sitecustomize.py):")
    if commits:
        print(
            f"  ingress group commits: {len(commits)} for {sum(commits)} messages; messages per commit: "
            f"mean {statistics.mean(commits):.1f}, median {statistics.median(commits):.0f}, max {max(commits)}"
        )
    all_jobs = [r for rs in jobs.values() for r in rs]
    if all_jobs:
        ns = [int(r["n"]) for r in all_jobs]
        print(
            f"  delivery jobs: {len(ns)} for {sum(ns)} messages; messages per job: mean {statistics.mean(ns):.1f}, "
            f"median {statistics.median(ns):.0f}, max {max(ns)}; worker-side commits (finish_message): "
            f"{worker_commits}"
        )
        for name, rs in sorted(jobs.items()):
            inside = sum(r["s"] for r in rs)
            span = (rs[-1]["t"] - (rs[0]["t"] - rs[0]["s"])) if rs else 0.0
            n = sum(int(r["n"]) for r in rs)
            print(
                f"    {name}: {len(rs)} jobs, {n} msgs, {inside:.2f}s inside deliver() over a {span:.2f}s span "
                f"({inside / n * 1000 if n else 0:.2f} ms/msg inside, "
                f"{(span - inside) / len(rs) * 1000:.1f} ms/job outside = RQ + idle)"
            )


def redis_commandstats(sock: Path, messages: int, top: int = 14) -> None:
    """Redis commands per accepted message over the whole run (ingress + workers + RQ)."""
    import redis

    try:
        r = redis.Redis(unix_socket_path=str(sock), socket_timeout=5)
        stats = r.info("commandstats")
        r.close()
    except (redis.RedisError, OSError) as e:
        print(f"  redis commandstats unavailable: {e}")
        return
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    usec = {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in stats.items()}
    total = sum(calls.values())
    print(
        f"\nredis: {total} commands = {total / max(1, messages):.1f} per message, "
        f"{sum(usec.values()) / 1e6:.2f}s of Redis CPU in commands; top:"
    )
    for k, n in sorted(calls.items(), key=lambda x: -x[1])[:top]:
        print(f"    {k:16}{n:>8}{n / max(1, messages):>8.2f}/msg")


def run_mtaq(a: argparse.Namespace, tmp: Path, sink_port: int, counter: Path) -> list[Row]:
    mtaq_port = free_port()
    env = dict(os.environ, MTAQ_LOG_LEVEL="WARNING", MTAQ_HOSTNAME="bench.test")
    trace_dir = Path(a.trace).absolute() if a.trace else None
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        for f in trace_dir.glob("*.jsonl"):
            f.unlink()
        env["MTAQ_BENCH_TRACE"] = str(trace_dir)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(BENCH / "trace"), env.get("PYTHONPATH", "")) if x)
    extra = [f"--{k}={v}" for k, v in (x.split("=", 1) for x in a.mtaq_opt)]
    already = count(counter)
    mtaq = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtaq",
            "run",
            "--data-dir",
            str(tmp / "var"),
            "--listen",
            f"127.0.0.1:{mtaq_port}",
            "--workers",
            str(a.workers),
            "--relayhost",
            f"[127.0.0.1]:{sink_port}",
            "--redis-appendfsync",
            a.appendfsync,
            *extra,
        ],
        env=env,
    )
    profs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        wait_port(mtaq_port)
        if a.py_spy:
            profs = start_profilers(mtaq.pid, Path(a.py_spy), 1 + a.workers, wall=a.wall)
        print(f"mtaq run: {a.workers} workers, appendfsync {a.appendfsync}; sending {a.messages} messages", flush=True)
        t0 = time.perf_counter()
        acc = run_load("127.0.0.1", mtaq_port, messages=a.messages, concurrency=a.concurrency, size=a.size)
        print(
            f"  mtaq accepted {acc.sent} ({acc.failed} failed) in {acc.seconds:.2f}s = {acc.rate:.0f} msgs/s",
            flush=True,
        )
        delivered = wait_delivered("mtaq", counter, already, acc.sent, t0, a.timeout)
        if trace_dir is not None:
            redis_commandstats(tmp / "var" / "redis.sock", acc.sent)
    finally:
        for _, p in profs:
            stop(p, signal.SIGINT, 30)
        stop(mtaq)
    if profs:
        from bench.pyspy_summary import summarise

        for name, _ in profs:
            summarise(
                Path(a.py_spy) / f"{name}.txt",
                top=a.top,
                files=r"\((worker|common|ingress|rq|smtplib|redis/client|concurrent)",
            )
    if trace_dir is not None:
        trace_summary(trace_dir)
    return [
        Row("mtaq", "accept", acc.rate, f"{acc.failed} failed" if acc.failed else ""),
        Row("mtaq", "deliver", delivered),
    ]


def run_postfix(a: argparse.Namespace, tmp: Path, sink_port: int, counter: Path) -> list[Row]:
    from bench import postfix

    rows: list[Row] = []
    why = postfix.missing_sink()
    if why:
        print(f"smtp-sink baseline skipped: {why}", flush=True)
    else:
        port = free_port()
        with postfix.SmtpSink(port):
            wait_port(port)
            print(f"baseline: {a.messages} messages, {a.concurrency} connections -> Postfix smtp-sink", flush=True)
            r = run_load("127.0.0.1", port, messages=a.messages, concurrency=a.concurrency, size=a.size)
            print(
                f"  smtp-sink accepted {r.sent} ({r.failed} failed) in {r.seconds:.2f}s = {r.rate:.0f} msgs/s",
                flush=True,
            )
            rows.append(Row("smtp-sink", "accept", r.rate))
    why = postfix.missing()
    if why:
        print(f"Postfix baseline skipped: {why}", flush=True)
        return rows
    port = free_port()
    inst = postfix.PostfixInstance(tmp / "postfix", port, sink_port)
    already = count(counter)
    try:
        inst.start()
    except RuntimeError as e:
        print(f"Postfix baseline skipped: {e}\n{inst.log_tail()}", flush=True)
        return rows
    try:
        wait_port(port)
        print(
            f"postfix {inst.config_dir}: relayhost [127.0.0.1]:{sink_port}; sending {a.messages} messages", flush=True
        )
        t0 = time.perf_counter()
        acc = run_load("127.0.0.1", port, messages=a.messages, concurrency=a.concurrency, size=a.size)
        print(
            f"  postfix accepted {acc.sent} ({acc.failed} failed) in {acc.seconds:.2f}s = {acc.rate:.0f} msgs/s",
            flush=True,
        )
        delivered = wait_delivered("postfix", counter, already, acc.sent, t0, a.timeout)
        if count(counter) - already < acc.sent:
            print(f"  postfix queue: {inst.queued()} file(s) left\n{inst.log_tail(5)}", flush=True)
    finally:
        inst.stop()
    rows += [
        Row("postfix", "accept", acc.rate, f"{acc.failed} failed" if acc.failed else ""),
        Row("postfix", "deliver", delivered),
    ]
    return rows


def table(rows: list[Row]) -> None:
    def find(name: str, kind: str) -> float | None:
        return next((r.rate for r in rows if r.name == name and r.kind == kind), None)

    base_sink, base_c = find("aiosmtpd sink", "accept"), find("smtp-sink", "accept")

    def vs_sink(r: Row) -> float | None:
        return base_sink

    def vs_c(r: Row) -> float | None:
        return base_c

    def vs_postfix(r: Row) -> float | None:
        return find("postfix", r.kind)

    cols = [("vs aiosmtpd sink", vs_sink), ("vs smtp-sink", vs_c), ("vs postfix", vs_postfix)]
    cols = [c for c in cols if any(c[1](r) for r in rows)]
    order = ["aiosmtpd sink", "smtp-sink", "postfix", "mtaq"]
    rows = sorted(rows, key=lambda r: (order.index(r.name) if r.name in order else len(order), r.kind))
    print()
    print(f"{'':26}{'msgs/s':>9}" + "".join(f"{name:>18}" for name, _ in cols))
    for r in rows:
        label = f"{r.name} {'accepted' if r.kind == 'accept' else 'delivered'}"
        cells = []
        for _, ref in cols:
            v = ref(r)
            cells.append(f"{r.rate / v:>18.2f}" if v else f"{'-':>18}")
        print(f"{label:26}{r.rate:>9.0f}" + "".join(cells) + (f"  ({r.detail})" if r.detail else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=2000, help="octets per message")
    p.add_argument("--appendfsync", default="always", choices=["always", "everysec"])
    p.add_argument("--timeout", type=float, default=600.0, help="give up waiting for delivery after this")
    p.add_argument("--postfix", action="store_true", help="add the smtp-sink and Postfix baselines if installed")
    p.add_argument("--no-mtaq", action="store_true", help="baselines only")
    p.add_argument(
        "--mtaq-opt",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra `mtaq run` option, e.g. --mtaq-opt job-max-messages=50 (repeatable)",
    )
    p.add_argument("--trace", metavar="DIR", help="record messages per group commit / per job in DIR")
    p.add_argument("--py-spy", metavar="DIR", help="py-spy profiles of the mtaq processes into DIR")
    p.add_argument(
        "--wall",
        action="store_true",
        help="py-spy --idle: wall-clock profile (blocked in recv/epoll counts), not CPU only",
    )
    p.add_argument("--top", type=int, default=15, help="lines per py-spy summary")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (queues, logs)")
    a = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mtaq-bench-"))
    sink_port = free_port()
    counter = tmp / "count"
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.sink", "--port", str(sink_port), "--count-file", str(counter)]
    )
    rows: list[Row] = []
    try:
        wait_port(sink_port)
        print(f"baseline: {a.messages} messages, {a.concurrency} connections -> aiosmtpd sink", flush=True)
        base = run_load("127.0.0.1", sink_port, messages=a.messages, concurrency=a.concurrency, size=a.size)
        print(
            f"  aiosmtpd sink accepted {base.sent} ({base.failed} failed) in {base.seconds:.2f}s "
            f"= {base.rate:.0f} msgs/s",
            flush=True,
        )
        rows.append(Row("aiosmtpd sink", "accept", base.rate))
        time.sleep(0.5)
        if not a.no_mtaq:
            rows += run_mtaq(a, tmp, sink_port, counter)
        if a.postfix:
            rows += run_postfix(a, tmp, sink_port, counter)
        table(rows)
    finally:
        stop(sink)
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


if __name__ == "__main__":
    main()
