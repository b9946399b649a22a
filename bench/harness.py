"""One measurement: start a system fresh, send one load through it to the sink, wait until the
sink has everything (bounded), stop the system; figures in a ``Result``. Shared by
bench/throughput.py (the headline loads) and bench/slowdest.py (slow remote servers)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult
from bench.loads import Load, Probe, Progress, generator, smtp_source
from bench.measure import Sampler
from bench.report import Result, environment, public_path, render_medians, result_json, rows, write_json
from bench.sinkdump import Sink, ensure_postfix_tools
from bench.systems import System

__all__ = ["begin", "finish", "measure", "measure_and_print"]


@contextlib.contextmanager
def progress_line(text: Callable[[], str], every: float = 1.0) -> Iterator[None]:
    """A line rewritten in place on a terminal (a new line every 5 s when stdout is a file)."""
    tty = sys.stdout.isatty()
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every if tty else 5.0):
            print(f"\r{text():<100}" if tty else text(), end="" if tty else "\n", flush=True)

    t = threading.Thread(target=run, name="bench-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        if tty:
            print(f"\r{'':<100}\r", end="", flush=True)


def _wait_delivered(sink: Sink, target: int, deadline: float) -> bool:
    while sink.count() < target:
        if not sink.alive():
            raise RuntimeError("the sink exited (smtp-sink logs why on stderr)")
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    # a file exists from MAIL on; its content lands at the end of DATA
    settle = time.monotonic() + 5
    while any(f.stat().st_size == 0 for f in sink.files()) and time.monotonic() < settle:
        time.sleep(0.05)
    return True


def measure(
    system: System,
    load: Load,
    sink: Sink,
    *,
    probe_interval: float = 0.05,
    around: Callable[[System], contextlib.AbstractContextManager[None]] | None = None,
    run: int = 1,
) -> Result:
    """``around(system)`` is entered once the system is up and left when all is delivered (the
    profilers of bench/profile.py)."""
    sink.collect()  # start empty
    loadavg = float(Path("/proc/loadavg").read_text().split()[0])
    progress = Progress()
    probe: Probe | None = None
    note = ""
    system.start()
    try:
        # ``around`` first: what it measures before the load (bench/rediscost.py ``idle``) is no part
        # of the load's CPU
        with around(system) if around else contextlib.nullcontext(), Sampler(system.roots()) as sampler:
            t0 = time.time()
            started = time.monotonic()

            def line() -> str:
                got = sink.count() if system.delivers else 0
                return (
                    f"  {load.kind} -> {system.name}: accepted {progress.sent}/{load.messages}"
                    + (f", at the sink {got}" if system.delivers else "")
                    + f", {time.monotonic() - started:.0f}s"
                )

            with progress_line(line):
                send = smtp_source if load.kind.startswith("smtp-source") else generator
                if load.probed and system.delivers and probe_interval > 0:
                    probe = Probe("127.0.0.1", system.port, size=load.size, interval=probe_interval)
                with probe or contextlib.nullcontext():
                    res: LoadResult = send("127.0.0.1", system.port, load, progress)
                ok = True
                if system.delivers:
                    target = res.sent + (probe.sent if probe else 0)
                    ok = _wait_delivered(sink, target, started + load.timeout)
                    if not ok:
                        note = f"TIMED OUT after {load.timeout:.0f}s"
        received = sink.collect() if system.delivers else []
    finally:
        system.stop()
    if not ok:
        print(f"  {system.name}: not all delivered; its log:\n{system.log_tail()}", flush=True)
    probes = probe.sent if probe else 0
    if res.failed:
        note = f"{res.failed} failed; {note}".strip("; ")
    if probe and probe.errors:
        note = f"{probe.errors} probe errors; {note}".strip("; ")
    return Result(
        load=load.kind,
        system=system.name,
        messages=load.messages,
        accepted=res.sent,
        delivered=max(0, len(received) - probes) if system.delivers else None,
        ingress_s=res.seconds,
        e2e_s=(max(r.at for r in received) - t0) if received else None,
        latencies=[lat for r in received if (lat := r.latency) is not None],
        cpu_s=sampler.cpu,
        cpu_by_role=sampler.cpu_by_role,
        peak_pss_mib=sampler.peak_pss_mib,
        peak_procs=sampler.peak_procs,
        note=note,
        run=run,
        loadavg=loadavg,
    )


def measure_and_print(system: System, load: Load, sink: Sink, **kw: Any) -> Result | None:
    """``measure`` with its one-line summary; None (and why) when the system could not run."""
    try:
        r = measure(system, load, sink, **kw)
    except RuntimeError as e:
        print(f"  {system.name}: {e}", flush=True)
        return None
    f = r.figures()
    print(
        f"  run {r.run} {load.kind} -> {r.system}: {f['ingress_msgs_s']} msgs/s in, {f['e2e_msgs_s']} end to end, "
        f"p99 {f['latency_p99_ms']} ms, peak PSS {f['peak_pss_mib']} MiB" + (f" ({r.note})" if r.note else ""),
        flush=True,
    )
    top = [f"{role} {ms:.3f}" for role, ms in f["cpu_ms_per_msg_by_process"].items() if ms >= 0.005]
    if top:
        print(f"    CPU ms a message by process: {', '.join(top)}", flush=True)
    return r


def begin(label: str, mtaq: Path | None, *, need_mtaq: bool = False) -> dict[str, Any] | None:
    """The sink's tools (installed when missing, if we may) and the run's metadata; None when the
    tools are missing, or with ``need_mtaq`` the mtaq executable (after a line saying what to do)."""
    why = ensure_postfix_tools()
    if why:
        print(f"bench: {why}", file=sys.stderr)
        return None
    if need_mtaq and (mtaq is None or not mtaq.exists()):
        print(
            f"bench.{label}: no mtaq executable (--mtaq PATH; `make .venv/.installed-stamp` makes one)", file=sys.stderr
        )
        return None
    meta = environment(mtaq)
    print(f"{label}: {cpu_note()}; mtaq {meta['versions'].get('mtaq', {}).get('commit', '?')}", flush=True)
    return meta


def finish(a: argparse.Namespace, name: str, meta: dict[str, Any], results: list[Result], table: str) -> int:
    """The table, the medians of several runs, the JSON file; exit status 1 when nothing ran."""
    print(table)
    if a.runs > 1 and results:
        print(f"\nmedians over {a.runs} runs (ratios: the median of each run's ratio)")
        print(render_medians(rows(results)))
    if not results:
        print("bench: nothing was measured (see the lines above)", file=sys.stderr)
        return 1
    meta["host"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    params = {k: public_path(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k != "results"}
    print(f"\nwrote {write_json(a.results, name, result_json({**meta, 'params': params}, results))}")
    return 0


def cpu_note() -> str:
    """The load average while we start: the machine may be shared, which makes the figures noisy."""
    with open("/proc/loadavg") as f:
        la = f.read().split()[:3]
    return f"{os.cpu_count()} CPUs, load average {' '.join(la)}"
