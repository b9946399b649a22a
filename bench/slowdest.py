"""Slow remote servers: what decides an outbound MTA's speed on the internet (issue 8).

Ten destination domains d0.slow.test .. d9.slow.test, each with its MX (mx.dN.slow.test) on its own
loopback address 127.0.0.10 .. 127.0.0.19, where a Postfix ``smtp-sink -w 1`` waits 1 s before it
answers DATA. A DNS server on loopback (tests/dnsserver.py) answers MX and A for them; mtaq's
workers resolve through it (MTAQ_DNS_SERVERS). A private Postfix resolves through the system's
resolver only, which cannot be pointed at a loopback port, so Postfix gets a ``transport_maps``
entry per domain (``dN.slow.test smtp:[127.0.0.1N]:PORT``) instead: the same servers, without the
(cached, sub-millisecond) MX lookup.

``smtp-sink -w 1`` answers DATA on its event loop's whole-second timer, not a second after the
command: a connection carries about one message a second, in step with the clock, so the load is
rounds of up to 200 messages (10 destinations x 20 connections) and end to end comes in whole
rounds (about 5.3, 6.3 or 7.3 s for 1,000 messages), by how many connection-rounds a system left
unused and where in its second the load began (docs/performance.md, December 7).

Load: bench/loadgen.py, 1,000 messages of 2 KiB from 20 sessions, message n to domain n % 10;
mtaq (`mtaq run` defaults; --workers N adds a second mtaq) against Postfix with its defaults;
end-to-end msgs/s, latency and peak PSS, ratios to Postfix. Bounded by --timeout: a system that
has not delivered everything by then is reported with what it did deliver.

    python -m bench.slowdest
    python -m bench.slowdest --mtaq /path/to/other/checkout/.venv/bin/mtaq --runs 3
Required (issue 8): mtaq >= 1.0x Postfix's end-to-end rate at <= 2.0x its peak PSS.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench import postfix
from bench.harness import begin, finish, measure_and_print
from bench.loads import Load
from bench.report import Result, ratios, render_table
from bench.sinkdump import DumpSink, SinkGroup
from bench.systems import Mtaq, Postfix, System, free_port, wait_port
from bench.throughput import BENCH, default_mtaq, workdir

DOMAINS = 10
FIRST_IP = 10  # 127.0.0.10 ..


def domains(n: int = DOMAINS) -> list[str]:
    return [f"d{i}.slow.test" for i in range(n)]


def mx_ip(i: int) -> str:
    return f"127.0.0.{FIRST_IP + i}"


def zone(n: int = DOMAINS) -> dict[str, list[tuple[str, str]]]:
    """MX and A records: dN.slow.test -> mx.dN.slow.test -> 127.0.0.(10+N)."""
    records: dict[str, list[tuple[str, str]]] = {}
    for i, d in enumerate(domains(n)):
        records[f"{d}."] = [("MX", f"10 mx.{d}.")]
        records[f"mx.{d}."] = [("A", mx_ip(i))]
    return records


def transports(port: int, n: int = DOMAINS) -> dict[str, str]:
    return {d: f"smtp:[{mx_ip(i)}]:{port}" for i, d in enumerate(domains(n))}


@contextmanager
def slow_sinks(tmp: Path, wait: float) -> Iterator[tuple[int, SinkGroup]]:
    """The destinations' MX hosts: an ``smtp-sink`` waiting ``wait`` s at DATA on each mx_ip, all
    on one port (common_port), files under ``tmp``; up and answering when this yields."""
    port = common_port()
    sinks = [DumpSink(tmp / f"sink{i}", mx_ip(i), port, wait_data=wait) for i in range(DOMAINS)]
    with SinkGroup(sinks) as group:
        for i in range(DOMAINS):
            wait_port(port, host=mx_ip(i))
        yield port, group


def common_port(n: int = DOMAINS) -> int:
    """A port free on every sink address (mtaq has one smtp_port for all destinations)."""
    for _ in range(50):
        port = free_port(mx_ip(0))
        try:
            for i in range(1, n):
                with socket.socket() as s:
                    s.bind((mx_ip(i), port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on all of 127.0.0.10-19")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=1000, help="messages (1000)")
    p.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (20)")
    p.add_argument("--size", type=int, default=2048, help="octets per message (2048)")
    p.add_argument("--wait", type=float, default=1.0, help="seconds each sink waits before answering DATA (1)")
    p.add_argument("--workers", type=int, default=0, help="also run `mtaq run --workers N` (0 = only defaults)")
    p.add_argument("--systems", default="postfix,mtaq", help="comma list of postfix, mtaq")
    p.add_argument("--mtaq", type=Path, default=default_mtaq(), help="the mtaq executable (any checkout's venv)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0, help="stop waiting for delivery after this (120 s)")
    p.add_argument("--results", type=Path, default=BENCH / "results")
    p.add_argument("--keep", action="store_true")
    return p.parse_args(argv)


def systems(a: argparse.Namespace, base: Path, dns_port: int, port: int) -> list[System]:
    wanted = [x.strip() for x in a.systems.split(",") if x.strip()]
    out: list[System] = []
    if "postfix" in wanted:
        why = postfix.missing()
        if why:
            print(f"postfix skipped: {why}")
        else:
            out.append(Postfix(base / "postfix", transports=transports(port)))
    if "mtaq" in wanted:
        if a.mtaq is None or not a.mtaq.exists():
            print("mtaq skipped: no mtaq executable (--mtaq PATH)")
        else:
            dns = f"127.0.0.1:{dns_port}"
            out.append(Mtaq(a.mtaq, base / "mtaq", dns_servers=dns, smtp_port=port))
            if a.workers:
                out.append(Mtaq(a.mtaq, base / "mtaq-w", workers=a.workers, dns_servers=dns, smtp_port=port))
    return out


def verdict(results: Sequence[Result]) -> list[str]:
    """Issue 8's bar per mtaq run: >= 1.0x Postfix's end-to-end rate at <= 2.0x its peak PSS."""
    lines = []
    for (run, _load, system), x in ratios(results).items():
        rate, mem = x["e2e_msgs_s"], x["peak_pss_mib"]
        if system.startswith("mtaq") and rate is not None and mem is not None:
            ok = rate >= 1.0 and mem <= 2.0
            lines.append(
                f"run {run} {system}: {rate:.2f}x Postfix's rate at {mem:.2f}x its memory: "
                f"{'meets' if ok else 'misses'} the bar (>= 1.0x at <= 2.0x)"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    from tests.dnsserver import ZoneServer  # the project's loopback DNS server; needs dnspython

    a = parse_args(argv)
    meta = begin("slowdest", a.mtaq)
    if meta is None:
        return 2
    load = Load("slowdest", a.messages, a.sessions, a.size, domains=tuple(domains()), timeout=a.timeout)
    results: list[Result] = []
    with workdir(a.keep) as tmp, ZoneServer(zone()) as dns, slow_sinks(tmp, a.wait) as (port, group):
        for run in range(1, a.runs + 1):
            for system in systems(a, tmp / str(run), dns.port, port):
                r = measure_and_print(system, load, group, run=run)
                results += [r] if r else []
    title = (
        f"slow destinations: 10 domains, smtp-sink -w {a.wait:g} each; {a.sessions} sessions, "
        f"{a.messages} messages of {a.size} B"
    )
    table = "\n".join([render_table(results, {"slowdest": title}), *verdict(results)])
    return finish(a, "slowdest", meta, results, table)


if __name__ == "__main__":
    sys.exit(main())
