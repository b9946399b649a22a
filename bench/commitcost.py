"""What the queue's counters cost on the paths that change the queue (issue 16): a bounded
micro-benchmark of the round trips as the ingress and the worker make them, against a real
redis-server (mtaq/runtime/embedded.RedisProcess on a unix socket, ``appendfsync`` as given).

Per round, ``--messages`` messages of ``--size`` octets to ``--domains`` domains, one recipient
each:
- commit: common/spool.Spool.commit in group commits of ``--batch`` (the ingress's group commit:
  messages, recipient states, index, delivery jobs, and now the counters, in one MULTI/EXEC);
- outcome: Store.set_status_list, every recipient delivered, ``--batch`` per round trip (the
  worker's outcome writer);
- finish: Spool.commit(delete=...) of those messages, ``--batch`` per transaction (the worker's
  finish).
Each phase's median over ``--rounds`` rounds, in microseconds per message: wall time, and CPU time
(this process's plus redis-server's, from INFO cpu), which a machine shared with other work
disturbs far less than wall time. Run it on two checkouts to compare (it uses only what both have):

    .venv/bin/python -m bench.commitcost --rounds 7
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus, new_queue_id
from common.redisconn import connect
from common.settings import Settings
from common.spool import Spool
from common.store import Message, Store
from mtaq.runtime.embedded import RedisProcess

__all__ = ["main", "one_round"]


def _cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return time.process_time() + float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class _Phase:
    def __init__(self, r: redis.Redis, out: dict[str, float], name: str, messages: int) -> None:
        self.r, self.out, self.name, self.messages = r, out, name, messages

    def __enter__(self) -> None:
        self.cpu, self.wall = _cpu(self.r), time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.out[self.name] = (time.perf_counter() - self.wall) / self.messages
        self.out[self.name + " cpu"] = (_cpu(self.r) - self.cpu) / self.messages


# Since issue 15 the outcome script removes a one-recipient message with no report due (what the
# worker's finisher did in a transaction of its own); a checkout from before has no ``last``.
_FINISH_IN_OUTCOME = "last" in inspect.signature(Store.set_status_list).parameters


def one_round(spool: Spool, messages: int, batch: int, size: int, domains: int) -> dict[str, float]:
    """Seconds per message of each phase (wall, and "<phase> cpu"), for one round."""
    body = b"Subject: cost\r\n\r\n" + b"x" * max(0, size - 19) + b"\r\n"
    made = [
        Message(
            Envelope(id=new_queue_id(), sender="s@cost.test", recipients=[Recipient(f"u{i}@d{i % domains}.test")]), body
        )
        for i in range(messages)
    ]
    groups = [made[i : i + batch] for i in range(0, messages, batch)]
    out: dict[str, float] = {}
    r = spool.store.redis
    with _Phase(r, out, "commit", messages):
        for g in groups:
            spool.commit(g)
    sent = RecipientStatus(state=RcptState.DELIVERED, attempts=1, dsn="2.0.0", reply="250 ok", updated=time.time())
    left: list[list[str]] = []
    with _Phase(r, out, "outcome", messages):
        for g in groups:
            entries = [(m.envelope.id, 0, sent) for m in g]
            if _FINISH_IN_OUTCOME:  # as the worker does: no report is due, the script removes them
                last = {m.envelope.id: m.envelope.recipients[0].address.rpartition("@")[2] for m in g}
                codes = spool.store.set_status_list(entries, last=last)  # type: ignore[call-arg,unused-ignore]
            else:
                codes = spool.store.set_status_list(entries)
            left.append([m.envelope.id for m, code in zip(g, codes, strict=True) if code == 0])  # finished, not removed
    with _Phase(r, out, "finish", messages):
        for ids in left:
            if ids:
                spool.commit([], delete=ids)
    spool.store.redis.delete("rq:queue:mtaq")  # the jobs of this round: nobody runs them
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.commitcost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--messages", type=int, default=2000, help="messages per round")
    ap.add_argument("--batch", type=int, default=8, help="messages per group commit / round trip")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--domains", type=int, default=10)
    ap.add_argument("--appendfsync", default="always", choices=["always", "everysec", "no"])
    a = ap.parse_args(argv)
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="mtaq-commitcost-") as tmp:
        sock = str(Path(tmp) / "redis.sock")
        rp = RedisProcess(tmp, unixsocket=sock, appendfsync=a.appendfsync)
        rp.start()
        try:
            r = connect(Settings().replace(redis_url=f"unix://{sock}"))  # as the roles connect
            spool = Spool.from_settings(Settings().replace(redis_url=f"unix://{sock}"), r)
            one_round(spool, min(200, a.messages), a.batch, a.size, a.domains)  # warm: scripts loaded
            for _ in range(max(1, a.rounds)):
                rounds.append(one_round(spool, a.messages, a.batch, a.size, a.domains))
            r.close()
        finally:
            rp.stop()
    print(f"{a.rounds} rounds of {a.messages} messages, {a.batch} per round trip, appendfsync {a.appendfsync}")
    for phase in ("commit", "outcome", "finish"):
        xs = sorted(x[phase] * 1e6 for x in rounds)
        cpu = statistics.median(x[phase + " cpu"] * 1e6 for x in rounds)
        print(
            f"  {phase:<8} wall median {statistics.median(xs):7.1f} us/message (min {xs[0]:.1f}),"
            f" cpu {cpu:6.1f} us/message"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
