"""The headline benchmark (`make bench`): the loads a user would send, through every system, to
the same sink, in the same run.

Loads (each bounded: --messages, --timeout):
  smtp-source      Postfix's smtp-source, a new connection per message
  smtp-source-d    the same with -d: connections reused
  generator        bench/loadgen.py: pipelining, --recipients per message, 100 messages/connection
Systems (each started fresh per load):
  aiosmtpd         aiosmtpd's sink accepting and discarding: the accept-only reference
  postfix          a private Postfix 3.x with its defaults relaying to the sink (bench/postfix.py)
  mtaq             `mtaq run` with its defaults (the checkout of --mtaq)
  mtaq-workers     `mtaq run --workers N` (--workers)
  mtaq-replica0    `mtaq run` against a Redis primary with a replica (TCP), redis_min_replicas=0
  mtaq-replica1    the same with redis_min_replicas=1: the cost of WAIT (bench/replicated.py)
Sink: one Postfix smtp-sink on 127.0.0.1, one file per message (bench/sinkdump.py).

Per system and load: ingress msgs/s (smtp-source/generator wall time), end-to-end msgs/s (first
connection -> last message at the sink), arrival -> delivered latency p50/p99 (the sink's receipt
time minus the message's X-Bench-Sent stamp: every generator message, probe messages beside an
smtp-source load), CPU seconds per 1,000 messages and peak PSS of all the system's processes
(/proc, bench/measure.py), and the ratios to Postfix. A table on stdout, JSON in bench/results/;
under each run's line, the CPU milliseconds per message of each process (mtaq ingress, mtaq
worker, redis-server; Postfix's daemons).

    python -m bench.throughput                                   # 5,000 x 4 KiB, 20 sessions
    python -m bench.throughput --messages 1000 --loads smtp-source-d --systems postfix,mtaq
    python -m bench.throughput --mtaq /path/to/other/checkout/.venv/bin/mtaq --runs 3
    python -m bench.throughput --systems mtaq --py-spy /tmp/prof --trace /tmp/trace
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench import postfix
from bench.harness import begin, finish, measure_and_print
from bench.loads import Load
from bench.report import Result, render_table
from bench.sinkdump import DumpSink
from bench.systems import AcceptOnly, Mtaq, Postfix, System, free_port, wait_port

BENCH = Path(__file__).resolve().parent
LOADS = {"smtp-source": "smtp-source", "smtp-source-d": "smtp-source -d", "generator": "generator"}
SYSTEMS = ("aiosmtpd", "postfix", "mtaq", "mtaq-workers")
OPTIONAL_SYSTEMS = ("mtaq-replica0", "mtaq-replica1")  # only when asked for by --systems


def default_mtaq() -> Path | None:
    near = Path(sys.executable).parent / "mtaq"  # this checkout's venv
    found = str(near) if near.exists() else shutil.which("mtaq")
    return Path(found) if found else None


def _choices(text: str, allowed: Sequence[str], what: str) -> list[str]:
    got = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in got if x not in allowed]
    if bad:
        raise SystemExit(f"bench: unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return got


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=5000, help="messages per load and system (default 5000)")
    p.add_argument("--sessions", "--concurrency", type=int, default=20, help="parallel SMTP sessions (20)")
    p.add_argument("--size", type=int, default=4096, help="octets of content per message (4096)")
    p.add_argument("--loads", default=",".join(LOADS), help=f"comma list of {', '.join(LOADS)}")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--workers", type=int, default=4, help="workers of the mtaq-workers system (4)")
    p.add_argument("--recipients", type=int, default=1, help="recipients per message (generator, smtp-source -r)")
    p.add_argument("--per-connection", type=int, default=100, help="messages per connection (generator)")
    p.add_argument("--probe-interval", type=float, default=0.05, help="s between latency probes (0 = none)")
    p.add_argument("--mtaq", type=Path, default=default_mtaq(), help="the mtaq executable (any checkout's venv)")
    p.add_argument("--runs", type=int, default=1, help="repeat everything (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up on a load after this many seconds")
    p.add_argument("--results", type=Path, default=BENCH / "results", help="where the JSON goes")
    p.add_argument("--trace", type=Path, metavar="DIR", help="mtaq: messages per commit and job, Redis commands")
    p.add_argument("--py-spy", type=Path, metavar="DIR", help="mtaq: py-spy profiles of its processes")
    p.add_argument("--wall", action="store_true", help="py-spy --idle (wall clock, not CPU only)")
    p.add_argument("--top", type=int, default=15, help="lines per py-spy summary")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (queues, logs)")
    a = p.parse_args(argv)
    a.loads = _choices(a.loads, list(LOADS), "load")
    a.systems = _choices(a.systems, [*SYSTEMS, *OPTIONAL_SYSTEMS], "system")
    if a.messages < 1 or a.sessions < 1 or a.size < 1 or a.runs < 1:
        p.error("--messages, --sessions, --size and --runs must be positive")
    return a


def make_system(kind: str, a: argparse.Namespace, base: Path, sink_port: int) -> System | None:
    """The system, or None (with a line saying why) when it cannot run here."""
    if kind == "aiosmtpd":
        return AcceptOnly(base)
    if kind == "postfix":
        why = postfix.missing()
        if why:
            print(f"postfix skipped: {why}", flush=True)
            return None
        return Postfix(base, relay_port=sink_port)
    if a.mtaq is None or not a.mtaq.exists():
        print(f"{kind} skipped: no mtaq executable (--mtaq PATH; `make .venv/.installed-stamp` makes one)")
        return None
    env = {}
    if a.trace:
        from bench.profile import trace_env

        env = trace_env(a.trace.absolute())
    if kind in OPTIONAL_SYSTEMS:
        from bench.replicated import ReplicatedMtaq

        return ReplicatedMtaq(a.mtaq, base, min_replicas=int(kind[-1]), relayhost=f"[127.0.0.1]:{sink_port}")
    workers = a.workers if kind == "mtaq-workers" else None
    return Mtaq(a.mtaq, base, workers=workers, relayhost=f"[127.0.0.1]:{sink_port}", extra_env=env)


def instrumenter(a: argparse.Namespace) -> Callable[[System], contextlib.AbstractContextManager[None]] | None:
    if not (a.trace or a.py_spy):
        return None
    from bench.profile import instrument

    def around(system: System) -> contextlib.AbstractContextManager[None]:
        if not isinstance(system, Mtaq):
            return contextlib.nullcontext()
        workers = int(system.env.get("MTAQ_WORKERS", "2"))
        return instrument(
            system, trace=a.trace, py_spy=a.py_spy, wall=a.wall, top=a.top, workers=workers, messages=a.messages
        )

    return around


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="mtaq-bench-"))
    try:
        yield tmp
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def describe(a: argparse.Namespace) -> dict[str, str]:
    common = f"{a.sessions} sessions, {a.messages} messages of {a.size} B"
    return {
        "smtp-source": f"smtp-source, a new connection per message; {common}",
        "smtp-source -d": f"smtp-source -d, connections reused; {common}",
        "generator": f"generator (pipelining, {a.recipients} rcpt/msg, {a.per_connection} msgs/conn); {common}",
    }


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    meta = begin("bench", a.mtaq)
    if meta is None:
        return 2
    results: list[Result] = []
    around = instrumenter(a)
    with workdir(a.keep) as tmp:
        sink_port = free_port()
        with DumpSink(tmp / "sink", "127.0.0.1", sink_port) as sink:
            wait_port(sink_port)
            for run in range(1, a.runs + 1):
                for load_name in a.loads:
                    load = Load(
                        LOADS[load_name],
                        a.messages,
                        a.sessions,
                        a.size,
                        recipients=a.recipients,
                        per_connection=a.per_connection,
                        timeout=a.timeout,
                    )
                    # every other run in reverse order, so that a drift in the machine's other
                    # load does not always fall on the same system
                    for kind in a.systems if run % 2 else a.systems[::-1]:
                        system = make_system(kind, a, tmp / f"{run}-{load_name}-{kind}", sink_port)
                        if system is None:
                            continue
                        r = measure_and_print(
                            system, load, sink, probe_interval=a.probe_interval, around=around, run=run
                        )
                        results += [r] if r else []
    return finish(a, "throughput", meta, results, render_table(results, describe(a)))


if __name__ == "__main__":
    sys.exit(main())
