"""The ceiling of one Redis (`make bench-ceiling`, issue 15): every host of a deployment shares one
Redis, which runs commands on one core, so what a delivered message costs Redis bounds the whole
deployment's rate however many workers it has.

Load (issue 15's): one Redis, one ingress and 1, 2, then 4 worker processes of 10 conversations
each (`mtaq run --workers N`, MTAQ_WORKER_CONCURRENCY=10: separate `mtaq worker` processes), ten
destinations whose MX is `smtp-sink -w 1` (1 s at DATA; bench/slowdest.py's loopback DNS and
sinks), --messages (800) of 2 KiB from 20 sessions. Per worker count: msgs/s end to end, its
scale-out against one worker, Redis commands per delivered message (INFO commandstats: the
commands Lua scripts run count too), Redis CPU per message (used_cpu_sys + used_cpu_user), and the
msgs/s one Redis core would carry at that cost (1 / CPU per message). ``--phases`` adds a run at
the largest worker count with MONITOR on (which costs Redis CPU of its own, so its figures are
not in the table above it): commands per message per phase of a message's life, each as the
clients send them and as Lua runs them (bench/rediscost.py).

    python -m bench.ceiling                       # 1, 2, 4 workers, 800 messages
    python -m bench.ceiling --workers 4 --phases  # where the commands go
    python -m bench.ceiling --mtaq /other/checkout/.venv/bin/mtaq
Issue 15's target: <= 15 commands and <= 0.3 ms of Redis CPU per message at 4 workers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import begin, finish, measure_and_print
from bench.loads import Load
from bench.rediscost import Cost, RedisCost
from bench.report import Result
from bench.scaling import in_order
from bench.slowdest import DOMAINS, domains, slow_sinks, zone
from bench.systems import Mtaq
from bench.throughput import BENCH, default_mtaq, workdir

WORKERS = (1, 2, 4)
CONVERSATIONS = 10  # per worker process
TARGET_COMMANDS = 15.0
TARGET_CPU_MS = 0.3


@dataclass
class Row:
    """One worker count's figures."""

    workers: int
    result: Result
    cost: Cost | None

    def figures(self) -> dict[str, Any]:
        f: dict[str, Any] = {"workers": self.workers, "e2e_msgs_s": self.result.figures()["e2e_msgs_s"]}
        f["delivered"] = self.result.delivered
        if self.cost is not None:
            f.update(self.cost.per_message(self.result.delivered or 0))
            f["top_commands_per_msg"] = top_commands(self.cost, self.result.delivered or 0)
        return f


def top_commands(cost: Cost, delivered: int, n: int = 12) -> dict[str, float]:
    d = max(1, delivered)
    return {k: round(v / d, 2) for k, v in cost.commands.most_common(n)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default=",".join(map(str, WORKERS)), help="comma list of worker counts (1,2,4)")
    p.add_argument("--messages", type=int, default=800, help="messages per worker count (800)")
    p.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (20)")
    p.add_argument("--size", type=int, default=2048, help="octets per message (2048)")
    p.add_argument("--wait", type=float, default=1.0, help="seconds each sink waits before answering DATA (1)")
    p.add_argument("--conversations", type=int, default=CONVERSATIONS, help="per worker process (10)")
    p.add_argument(
        "--idle",
        type=float,
        default=10.0,
        help="seconds of each system up without mail measured first: what of Redis's cost does not grow with mail (10)",
    )
    p.add_argument("--phases", action="store_true", help="also a MONITOR run at the largest worker count")
    p.add_argument("--monitor-dump", type=Path, help="with --phases: the raw MONITOR lines to this file")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="give up on a load after this many seconds (300)")
    p.add_argument("--mtaq", type=Path, default=default_mtaq(), help="the mtaq executable (any checkout's venv)")
    p.add_argument("--results", type=Path, default=BENCH / "results")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args(argv)
    try:
        a.workers = sorted({int(x) for x in a.workers.split(",") if x.strip()})
    except ValueError:
        p.error("--workers: a comma list of numbers, e.g. 1,2,4")
    if not a.workers or min(a.workers) < 1 or min(a.messages, a.sessions, a.conversations, a.runs) < 1:
        p.error("--workers, --messages, --sessions, --conversations and --runs must be positive")
    return a


def ceiling_table(rows: Sequence[Row]) -> str:
    """The scale-out with what each delivered message cost Redis and the ceiling that follows."""
    head = (
        f"{'workers':>7}{'msgs/s':>9}{'scale':>7}{'delivered':>10}{'cmds/msg':>10}{'trips/msg':>10}"
        f"{'Redis CPU ms/msg':>18}{'sys':>5}{'one Redis core, msgs/s':>24}"
        f"{'idle ms/s':>10}{'less idle: ms/msg':>19}{'cmds/msg':>9}{'one core':>9}"
    )
    out = [head]
    base = {r.result.run: r.result.e2e_rate for r in rows if r.workers == min(x.workers for x in rows)}
    for r in rows:
        rate = r.result.e2e_rate
        one = base.get(r.result.run)
        scale = f"{rate / one:.2f}x" if rate and one else "-"
        f = r.cost.per_message(r.result.delivered or 0) if r.cost else {}
        out.append(
            f"{r.workers:>7}{rate or 0:>9.1f}{scale:>7}{r.result.delivered or 0:>10}"
            f"{f.get('commands_per_msg', '-'):>10}{f.get('round_trips_per_msg', '-'):>10}"
            f"{f.get('cpu_ms_per_msg', '-'):>18}{_share(f.get('sys_share')):>5}{f.get('one_core_msgs_s', '-'):>24}"
            f"{f.get('idle_cpu_ms_per_s', '-'):>10}{f.get('marginal_cpu_ms_per_msg', '-'):>19}"
            f"{_less(f.get('commands_per_msg'), f.get('idle_commands_per_msg')):>9}"
            f"{f.get('marginal_one_core_msgs_s', '-'):>9}"
        )
    return "\n".join(out)


def _less(total: float | None, idle: float | None) -> str:
    return "-" if total is None or idle is None else f"{total - idle:.1f}"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def verdict(rows: Sequence[Row]) -> list[str]:
    """Issue 15's bar, at the largest worker count measured."""
    most = max((r.workers for r in rows), default=0)
    out = []
    for r in rows:
        if r.workers != most or r.cost is None:
            continue
        f = r.cost.per_message(r.result.delivered or 0)
        ok = f["commands_per_msg"] <= TARGET_COMMANDS and f["cpu_ms_per_msg"] <= TARGET_CPU_MS
        out.append(
            f"run {r.result.run}, {most} workers: {f['commands_per_msg']} commands and {f['cpu_ms_per_msg']} ms of "
            f"Redis CPU per message: {'meets' if ok else 'misses'} issue 15's bar "
            f"(<= {TARGET_COMMANDS:g} and <= {TARGET_CPU_MS:g} ms)"
        )
    return out


def phase_table(cost: Cost, delivered: int) -> str:
    if cost.tally is None:
        return ""
    rows = cost.tally.rows(delivered)
    out = [
        f"\nwhere the commands go (MONITOR, {delivered} messages; per delivered message)",
        f"{'phase':<24}{'client':>8}{'in Lua':>8}{'all':>8}",
    ]
    for phase, client, lua in rows:
        out.append(f"{phase:<24}{client:>8.2f}{lua:>8.2f}{client + lua:>8.2f}")
    c = sum(x[1] for x in rows)
    lua_n = sum(x[2] for x in rows)
    out.append(f"{'total':<24}{c:>8.2f}{lua_n:>8.2f}{c + lua_n:>8.2f}")
    return "\n".join(out)


def system(a: argparse.Namespace, base: Path, dns_port: int, port: int, workers: int) -> Mtaq:
    env = {"MTAQ_WORKER_CONCURRENCY": str(a.conversations)}
    return Mtaq(
        a.mtaq,
        base,
        workers=workers,
        dns_servers=f"127.0.0.1:{dns_port}",
        smtp_port=port,
        extra_env=env,
        name=f"mtaq w{workers}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    from tests.dnsserver import ZoneServer  # the project's loopback DNS server; needs dnspython

    a = parse_args(argv)
    meta = begin("ceiling", a.mtaq, need_mtaq=True)
    if meta is None:
        return 2
    load = Load("ceiling", a.messages, a.sessions, a.size, domains=tuple(domains()), timeout=a.timeout)
    rows: list[Row] = []
    phases = ""
    with workdir(a.keep) as tmp, ZoneServer(zone()) as dns, slow_sinks(tmp, a.wait) as (port, group):
        n = 0
        for run in range(1, a.runs + 1):
            for w in in_order(a.workers, run + 1):
                n += 1
                s = system(a, tmp / f"{n:03d}-w{w}", dns.port, port, w)
                probe = RedisCost(s.base / "var" / "redis.sock", idle=a.idle)
                r = measure_and_print(s, load, group, around=probe, run=run)
                if r is not None:
                    rows.append(Row(w, r, probe.cost))
        if a.phases:
            w = max(a.workers)
            s = system(a, tmp / "phases", dns.port, port, w)
            probe = RedisCost(s.base / "var" / "redis.sock", monitor=True, dump=a.monitor_dump)
            print(f"phases: {w} workers, MONITOR on", flush=True)
            r = measure_and_print(s, load, group, around=probe, run=0)
            if r is not None and probe.cost is not None and probe.cost.tally is not None:
                phases = phase_table(probe.cost, r.delivered or 0)
                rows_ = probe.cost.tally.rows(r.delivered or 0)
                meta["phases"] = {p: {"client": round(c, 3), "lua": round(x, 3)} for p, c, x in rows_}
    meta["ceiling"] = [r.figures() for r in rows]
    title = (
        f"the ceiling of one Redis: {a.messages} messages of {a.size} B from {a.sessions} sessions to "
        f"{DOMAINS} destinations (smtp-sink -w {a.wait:g}); N worker processes of {a.conversations} conversations"
    )
    table = "\n".join([title, ceiling_table(rows), *verdict(rows), *_top(rows)]) + phases
    return finish(a, "ceiling", meta, [r.result for r in rows], table)


def _top(rows: Sequence[Row]) -> list[str]:
    if not rows or rows[-1].cost is None:
        return []
    r = max(rows, key=lambda x: x.workers)
    assert r.cost is not None
    top = top_commands(r.cost, r.result.delivered or 0)
    return [f"commands per message at {r.workers} workers: " + ", ".join(f"{k.upper()} {v}" for k, v in top.items())]


if __name__ == "__main__":
    sys.exit(main())
