"""How mtaq scales (`make bench-scaling`, issue 9 item 3), each figure beside Postfix's on the same
smtp-sink in the same run, the systems of a part alternating their order from run to run.

Parts (--parts, each load bounded by --messages and --timeout):
  grid     `mtaq run --workers 1, 2, 4`, each with `--processes 1` and `2` (ingress processes;
           `run` takes 1 by default; given as MTAQ_WORKERS/MTAQ_PROCESSES, which any checkout
           reads, as bench/systems.py does for every setting), on smtp-source
           with a new connection per message and with -d, 4 KiB
  sizes    mtaq defaults: 1 KiB, 100 KiB and 1 MiB messages, and 4 KiB to 50 recipients each
           (smtp-source -r 50), all on smtp-source -d; the larger messages in fewer numbers
           (size_plan) so that every load moves about as many octets as it has time for
  backlog  --backlog messages waiting for a destination that is down (bench/backlog.py) while
           new mail flows to the sink: the new mail's rate and p50/p99 without and with the
           backlog, and Redis memory per queued message
Figures per system: ingress and end-to-end msgs/s, arrival -> delivered p50/p99, CPU s per 1,000
messages, peak PSS, ratios to Postfix (bench/report.py). With --runs N: each run's table, then
the medians (of each run's ratio). A table on stdout, JSON in bench/results/.

    python -m bench.scaling --runs 3                     # the published tables
    python -m bench.scaling --parts backlog --messages 1000 --backlog 20000
    python -m bench.scaling --mtaq /path/to/other/checkout/.venv/bin/mtaq --parts grid
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import postfix
from bench.backlog import Backlogged, MemoryPerMessage, zone
from bench.harness import begin, finish, measure_and_print
from bench.loads import Load
from bench.report import Result, render_table
from bench.sinkdump import DumpSink
from bench.systems import Mtaq, Postfix, System, free_port, wait_port
from bench.throughput import BENCH, default_mtaq, workdir

PARTS = ("grid", "sizes", "backlog")
GRID_LOADS = ("smtp-source", "smtp-source -d")
WORKERS = (1, 2, 4)
PROCESSES = (1, 2)
KIB = 1024
SINK_MX_IP = "127.0.0.2"  # the backlog part's sink, sink.test's MX


@dataclass(frozen=True)
class Case:
    """One load of a part: its label in the tables (unique within the part), what is sent, and
    the seconds between latency probes (slower for big messages, whose probes would be load)."""

    label: str
    load: Load
    probe_interval: float = 0.05


@dataclass(frozen=True)
class Variant:
    """An mtaq configuration: its name in the tables and its MTAQ_* settings."""

    name: str
    env: dict[str, str]


def grid_variants(workers: Sequence[int] = WORKERS, processes: Sequence[int] = PROCESSES) -> list[Variant]:
    return [
        Variant(f"mtaq w{w} p{p}", {"MTAQ_WORKERS": str(w), "MTAQ_PROCESSES": str(p)})
        for p in processes
        for w in workers
    ]


def size_plan(messages: int) -> list[tuple[str, int, int, int]]:
    """(label, octets, recipients, messages) of the sizes part: 1 MiB messages at a twentieth of
    the count (50 MiB per 1,000 asked), 100 KiB at a fifth, 50 recipients at half; never below 20."""
    return [
        ("1 KiB", KIB, 1, messages),
        ("100 KiB", 100 * KIB, 1, max(20, messages // 5)),
        ("1 MiB", KIB * KIB, 1, max(20, messages // 20)),
        ("4 KiB x 50 rcpt", 4 * KIB, 50, max(20, messages // 2)),
    ]


def grid_cases(a: argparse.Namespace) -> list[Case]:
    return [Case(f"grid {kind}", Load(kind, a.messages, a.sessions, 4 * KIB, timeout=a.timeout)) for kind in GRID_LOADS]


def size_cases(a: argparse.Namespace) -> list[Case]:
    out = []
    for label, octets, rcpts, n in size_plan(a.messages):
        load = Load("smtp-source -d", n, a.sessions, octets, recipients=rcpts, timeout=a.timeout)
        out.append(Case(f"size {label}", load, 0.05 if octets <= 100 * KIB else 0.5))
    return out


def in_order(items: Sequence[Any], run: int) -> list[Any]:
    """Every other run reversed, so that a drift in the machine's load does not always fall on the
    same system."""
    return list(items) if run % 2 else list(items)[::-1]


def relabel(r: Result | None, label: str) -> list[Result]:
    """The result under its case's label (the harness names results by the load's kind)."""
    if r is None:
        return []
    r.load = label
    return [r]


def _parts(text: str) -> list[str]:
    got = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in got if x not in PARTS]
    if bad or not got:
        raise SystemExit(f"bench.scaling: unknown part {', '.join(bad) or '(none)'}; choose from {', '.join(PARTS)}")
    return got


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--runs", type=int, default=1, help="repeat everything (default 1; 3 for docs/performance.md)")
    p.add_argument("--messages", type=int, default=2000, help="messages per grid load and system (2000)")
    p.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (20)")
    p.add_argument("--backlog", type=int, default=100_000, help="messages waiting for the down destination (100000)")
    p.add_argument("--backlog-size", type=int, default=4 * KIB, help="octets per backlog message (4096)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up on a load after this many seconds (300)")
    p.add_argument("--mtaq", type=Path, default=default_mtaq(), help="the mtaq executable (any checkout's venv)")
    p.add_argument("--results", type=Path, default=BENCH / "results", help="where the JSON goes")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (queues, logs)")
    a = p.parse_args(argv)
    a.parts = _parts(a.parts)
    if min(a.runs, a.messages, a.sessions, a.backlog_size) < 1 or a.backlog < 0 or a.timeout <= 0:
        p.error("--runs, --messages, --sessions, --backlog-size and --timeout must be positive (--backlog >= 0)")
    return a


class Bench:
    """The run's shared state: the sink, the DNS server's port, where systems live, the results."""

    def __init__(self, a: argparse.Namespace, tmp: Path, sink: DumpSink, mx_sink: DumpSink, dns_port: int) -> None:
        self.a, self.tmp, self.sink, self.dns_port = a, tmp, sink, dns_port
        self.mx_sink = mx_sink  # sink.test's MX: not on 127.0.0.1, where mtaq's loop check would see itself
        self.results: list[Result] = []
        self.memory: list[tuple[int, MemoryPerMessage]] = []
        self.have_postfix = postfix.missing() is None
        self._n = 0

    def base(self, name: str) -> Path:
        self._n += 1
        return self.tmp / f"{self._n:03d}-{name.replace(' ', '_')}"

    def postfix(self) -> System:
        return Postfix(self.base("postfix"), relay_port=self.sink.port)

    def mtaq(self, v: Variant) -> System:
        assert self.a.mtaq is not None
        relay = f"[127.0.0.1]:{self.sink.port}"
        return Mtaq(self.a.mtaq, self.base(v.name), relayhost=relay, extra_env=v.env, name=v.name)

    def measure(self, system: System, case: Case, run: int, sink: DumpSink | None = None) -> None:
        r = measure_and_print(system, case.load, sink or self.sink, probe_interval=case.probe_interval, run=run)
        self.results += relabel(r, case.label)

    def part(self, cases: Sequence[Case], variants: Sequence[Variant], run: int) -> None:
        for case in cases:
            print(f"run {run}: {case.label}, {case.load.messages} messages of {case.load.size} B", flush=True)
            for v in in_order([None, *variants] if self.have_postfix else variants, run):
                self.measure(self.postfix() if v is None else self.mtaq(v), case, run)

    def grid(self, run: int) -> None:
        self.part(grid_cases(self.a), grid_variants(), run)

    def sizes(self, run: int) -> None:
        self.part(size_cases(self.a), [Variant("mtaq", {})], run)

    def backlog(self, run: int) -> None:
        a = self.a
        load = Load("smtp-source -d", a.messages, a.sessions, 4 * KIB, timeout=a.timeout)
        case = Case("backlog: new mail", load)
        print(f"run {run}: new mail beside a backlog of {a.backlog} to a down destination", flush=True)
        for n in in_order([None, 0, a.backlog] if self.have_postfix else [0, a.backlog], run):
            if n is None:
                transport = {"sink.test": f"smtp:[{SINK_MX_IP}]:{self.mx_sink.port}"}
                self.measure(Postfix(self.base("postfix"), transports=transport), case, run, self.mx_sink)
                continue
            assert a.mtaq is not None
            name = f"mtaq + backlog {n}" if n else "mtaq"
            s = Backlogged(
                a.mtaq,
                self.base(name),
                dns_servers=f"127.0.0.1:{self.dns_port}",
                smtp_port=self.mx_sink.port,
                name=name,
                backlog=n,
                backlog_size=a.backlog_size,
            )
            self.measure(s, case, run, self.mx_sink)
            if s.memory is not None:
                self.memory.append((run, s.memory))


def describe(a: argparse.Namespace) -> dict[str, str]:
    out = {
        f"grid {k}": f"grid: {k}, {a.sessions} sessions, {a.messages} x 4 KiB (w = workers, p = ingress processes)"
        for k in GRID_LOADS
    }
    for label, octets, rcpts, n in size_plan(a.messages):
        out[f"size {label}"] = f"size: smtp-source -d, {n} messages of {octets} B, {rcpts} rcpt, {a.sessions} sessions"
    out["backlog: new mail"] = (
        f"backlog: smtp-source -d to sink.test, {a.messages} x 4 KiB, beside {a.backlog} queued for down.test"
    )
    return out


def memory_table(memory: Sequence[tuple[int, MemoryPerMessage]]) -> str:
    if not memory:
        return ""
    lines = ["", f"{'Redis memory per queued message':<34}{'messages':>10}{'B/msg':>8}{'beyond body':>12}{'fill/s':>8}"]
    for run, m in memory:
        f = m.figures()
        lines.append(
            f"{f'run {run} ({m.body_octets} B bodies)':<34}{m.messages:>10}{f['bytes_per_message']:>8}"
            f"{f['bytes_beyond_body']:>12}{f['fill_msgs_s'] or '-':>8}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from tests.dnsserver import ZoneServer  # the project's loopback DNS server; needs dnspython

    a = parse_args(argv)
    meta = begin("scaling", a.mtaq, need_mtaq=True)
    if meta is None:
        return 2
    if postfix.missing():
        print(f"bench.scaling: postfix baseline skipped: {postfix.missing()}", flush=True)
    with workdir(a.keep) as tmp, ZoneServer(zone(SINK_MX_IP)) as dns:
        port, mx_port = free_port(), free_port(SINK_MX_IP)
        with DumpSink(tmp / "sink", "127.0.0.1", port) as sink, DumpSink(tmp / "mx", SINK_MX_IP, mx_port) as mx:
            wait_port(port)
            wait_port(mx_port, host=SINK_MX_IP)
            b = Bench(a, tmp, sink, mx, dns.port)
            for run in range(1, a.runs + 1):
                for part in a.parts:
                    getattr(b, part)(run)
    meta["backlog_memory"] = [{"run": run, **m.figures()} for run, m in b.memory]
    return finish(a, "scaling", meta, b.results, render_table(b.results, describe(a)) + memory_table(b.memory))


if __name__ == "__main__":
    sys.exit(main())
