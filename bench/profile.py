"""Instrumentation of mtaq runs for profiling (the project is not changed):

- ``--trace DIR``: messages per group commit and per delivery job (bench/trace/sitecustomize.py on
  the mtaq processes' PYTHONPATH), and Redis commands per message (INFO commandstats);
- ``--py-spy DIR``: py-spy sampling profiles of the ingress and every worker, summarised at the end
  (bench/pyspy_summary.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench.systems import Mtaq, stop_proc

BENCH = Path(__file__).resolve().parent


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


def trace_env(trace_dir: Path) -> dict[str, str]:
    trace_dir.mkdir(parents=True, exist_ok=True)
    for f in trace_dir.glob("*.jsonl"):
        f.unlink()
    path = os.pathsep.join(x for x in (str(BENCH / "trace"), os.environ.get("PYTHONPATH", "")) if x)
    return {"MTAQ_BENCH_TRACE": str(trace_dir), "PYTHONPATH": path}


@contextlib.contextmanager
def instrument(
    system: Mtaq, *, trace: Path | None, py_spy: Path | None, wall: bool, top: int, workers: int, messages: int
) -> Iterator[None]:
    """Around one mtaq measurement: profilers attached after start, summaries after delivery."""
    profs = start_profilers(system.roots()[0], py_spy, 1 + workers, wall=wall) if py_spy else []
    try:
        yield
    finally:
        if trace is not None:
            redis_commandstats(system.base / "var" / "redis.sock", messages)
        for _, p in profs:
            stop_proc(p, 30, signal.SIGINT)
    if profs and py_spy is not None:
        from bench.pyspy_summary import summarise

        for name, _ in profs:
            summarise(
                py_spy / f"{name}.txt", top=top, files=r"\((worker|common|ingress|rq|smtplib|redis/client|concurrent)"
            )
    if trace is not None:
        trace_summary(trace)
