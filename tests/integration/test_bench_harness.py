"""The benchmark's measuring parts against real processes: smtp-sink's per-message files give the
receipt time and the sender's stamp; the /proc sampler sees a real process tree; a measurement
of the accept-only system yields a complete result. Small loads: a few seconds in all."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.harness import measure
from bench.loadgen import run_load
from bench.loads import Load
from bench.measure import Sampler, tree
from bench.sinkdump import DumpSink
from bench.systems import AcceptOnly, free_port, wait_port

pytestmark = pytest.mark.skipif(shutil.which("smtp-sink") is None, reason="needs Postfix's smtp-sink")


def test_sink_files_give_receipt_time_and_the_senders_stamp(tmp_path: Path) -> None:
    port = free_port()
    with DumpSink(tmp_path / "sink", "127.0.0.1", port) as sink:
        wait_port(port)
        before = time.time()
        res = run_load("127.0.0.1", port, messages=12, concurrency=3, size=3000, per_connection=5)
        after = time.time()
        assert (res.sent, res.failed) == (12, 0)
        deadline = time.monotonic() + 10
        while len([f for f in sink.files() if f.stat().st_size]) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        got = sink.collect()
        assert len(got) == 12
        for r in got:
            assert r.sent is not None and before <= r.sent <= after
            # the sink's mtime comes from the kernel's coarse clock: a few ms behind time.time()
            assert r.latency is not None and -0.05 < r.latency < after - before + 0.05
        assert sink.count() == 0  # collect() empties it for the next system


def test_sampler_sums_cpu_and_pss_over_a_process_tree() -> None:
    burn = "import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', 'sum(range(30_000_000))']); c.wait()"
    proc = subprocess.Popen([sys.executable, "-c", f"{burn}; import time; time.sleep(30)"])
    try:
        with Sampler([proc.pid], interval=0.05) as s:
            deadline = time.monotonic() + 20
            while s.peak_procs < 2 and time.monotonic() < deadline:  # the child runs
                time.sleep(0.02)
            while time.monotonic() < deadline:  # until the child has been waited for
                if len(tree([proc.pid])) == 1:
                    break
                time.sleep(0.02)
        assert s.peak_procs == 2
        assert s.peak_pss_kib > 1000  # two Python interpreters
        assert s.cpu > 0.1  # the dead child's CPU, through the parent's cutime
    finally:
        proc.kill()
        proc.wait()


def test_measure_the_accept_only_reference(tmp_path: Path) -> None:
    port = free_port()
    with DumpSink(tmp_path / "sink", "127.0.0.1", port) as sink:
        wait_port(port)
        load = Load("generator", 200, 4, 2000, timeout=30)  # enough CPU to show in 10 ms clock ticks
        r = measure(AcceptOnly(tmp_path / "sys"), load, sink)
    assert (r.system, r.accepted, r.delivered, r.e2e_rate) == ("aiosmtpd sink", 200, None, None)
    assert r.ingress_rate > 0 and r.peak_pss_mib > 5 and r.cpu_s > 0
