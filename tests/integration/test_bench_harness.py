"""The benchmark's measuring parts against real processes: smtp-sink's per-message files give the
receipt time and the sender's stamp; the /proc sampler sees a real process tree; a measurement
of the accept-only system yields a complete result. Small loads: a few seconds in all."""

from __future__ import annotations

import json
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
from bench.systems import AcceptOnly, wait_port
from tests.ports import free_port
from tests.tools import missing, require


@pytest.fixture(autouse=True)
def smtp_sink() -> str:
    """Postfix's smtp-sink: skipped without it, failed without it in CI (tests/tools.py)."""
    return require("smtp-sink")


# A failsafe, not a guess at how long anything takes: the waits below end on their event (the
# sink's files, the child's handshake) and only a broken sink or child ever reaches it.
FAILSAFE_S = 120


def _file_clock(path: Path) -> float:
    """Now, on the clock that stamps files (the kernel's coarse clock, a few ms behind time.time())."""
    path.write_bytes(b"")
    return path.stat().st_mtime


def test_sink_files_give_receipt_time_and_the_senders_stamp(tmp_path: Path) -> None:
    port = free_port()
    with DumpSink(tmp_path / "sink", "127.0.0.1", port) as sink:
        wait_port(port)
        # each bound below is ordered by events on one clock, never by a guess at a clock's lag
        before, file_before = time.time(), _file_clock(tmp_path / "before")
        res = run_load("127.0.0.1", port, messages=12, concurrency=3, size=3000, per_connection=5)
        assert (res.sent, res.failed) == (12, 0)
        deadline = time.monotonic() + FAILSAFE_S
        while len([f for f in sink.files() if f.stat().st_size]) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        got = sink.collect()
        file_after, after = _file_clock(tmp_path / "after"), time.time()  # after every mtime was read
        assert len(got) == 12
        for r in got:
            assert r.sent is not None and before <= r.sent <= after
            assert file_before <= r.at <= file_after  # the receipt time is the file's, during the load
            # the file clock never runs ahead of the real one
            assert r.latency is not None and file_before - after <= r.latency <= after - before
        assert sink.count() == 0  # collect() empties it for the next system


# The child burns CPU in a grandchild, waits for it, says so, and then waits for the test:
# every step an event the test waits on, none a guess at how long the burn takes.
_BURNER = """
import subprocess, sys
sys.stdout.write("child\\n"); sys.stdout.flush()
c = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); sum(range(30_000_000))"],
                     stdin=subprocess.PIPE)
sys.stdin.readline()               # the test has sampled the grandchild alive
c.stdin.close(); c.wait()          # burn, then reap: its CPU moves into our cutime/cstime
sys.stdout.write("reaped\\n"); sys.stdout.flush()
sys.stdin.readline()               # the test has taken its last sample
"""


def test_sampler_sums_cpu_and_pss_over_a_process_tree() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "child\n"
        # a long interval: the samples that count are the ones the test takes itself
        with Sampler([proc.pid], interval=3600) as s:
            deadline = time.monotonic() + FAILSAFE_S
            while len(tree([proc.pid])) < 2 and time.monotonic() < deadline:  # Popen has forked
                time.sleep(0.01)
            s.sample()
            assert s.peak_procs == 2
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "reaped\n"
        assert s.peak_pss_kib > 1000  # two Python interpreters
        assert s.cpu > 0.1  # the dead grandchild's CPU, through the parent's cutime
        # the same, all in the parent's role (its command name); summed in another order
        assert list(s.cpu_by_role.values()) == [pytest.approx(s.cpu)]
        assert len(tree([proc.pid])) == 1
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


def test_scaling_backlog_part_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench.scaling's backlog part at toy size: the loopback DNS routes new mail to the sink and
    the backlog to a dead address, the spool fill is measured, the JSON has both mtaq figures."""
    from bench.scaling import main
    from bench.throughput import default_mtaq

    require("smtp-source")
    exe = default_mtaq()
    if exe is None:
        missing("no mtaq executable in this venv")
    argv = ["--parts", "backlog", "--messages", "60", "--backlog", "300", "--timeout", "60"]
    assert main([*argv, "--mtaq", str(exe), "--results", str(tmp_path)]) == 0
    doc = json.loads(next(tmp_path.glob("*-scaling.json")).read_text())
    by_system = {e["system"]: e for e in doc["results"]}
    for name in ("mtaq", "mtaq + backlog 300"):
        assert by_system[name]["delivered"] == 60, capsys.readouterr().out
    (mem,) = doc["backlog_memory"]
    assert mem["messages"] == 300 and mem["bytes_per_message"] > mem["body_octets"] == 4096
    assert "Redis memory per queued message" in capsys.readouterr().out


def test_bodycost_names_every_process_and_what_it_spent(capsys: pytest.CaptureFixture[str]) -> None:
    """bench.bodycost at toy size: mtaq run, smtp-source and the sink; CPU by process, Redis's
    rewrites, peak PSS by process."""
    from bench.bodycost import main
    from bench.throughput import default_mtaq

    require("smtp-source")
    exe = default_mtaq()
    if exe is None:
        missing("no mtaq executable in this venv")
    assert main(["--messages", "6", "--sessions", "2", "--mtaq", str(exe), "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")}
    for name in ("ingress", "redis", "worker", "total"):
        assert name in rows, out
    assert float(rows["total"][2]) > 0, out  # 6 MiB through the system: some CPU shows in 10 ms ticks
    assert "forks (AOF rewrites)" in out and "peak PSS MiB: all" in out
