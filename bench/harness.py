"""One measurement: start a system fresh, send one load through it to the sink, wait until the
sink has everything (bounded), stop the system; figures in a ``Result``. Shared by
bench/throughput.py (the headline loads) and bench/slowdest.py (slow remote servers)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.loadgen import LoadResult
from bench.loads import Load, Probe, Progress, generator, smtp_source
from bench.measure import Sampler
from bench.report import Result
from bench.sinkdump import Sink
from bench.systems import System

__all__ = ["measure"]


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
        with Sampler(system.roots()) as sampler, around(system) if around else contextlib.nullcontext():
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
        peak_pss_mib=sampler.peak_pss_mib,
        peak_procs=sampler.peak_procs,
        note=note,
        run=run,
        loadavg=loadavg,
    )


def cpu_note() -> str:
    """The load average while we start: the machine may be shared, which makes the figures noisy."""
    with open("/proc/loadavg") as f:
        la = f.read().split()[:3]
    return f"{os.cpu_count()} CPUs, load average {' '.join(la)}"
