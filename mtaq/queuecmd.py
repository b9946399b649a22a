"""`mtaq queue`: the operator's view of the queue, in the layout of Postfix's mailq."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from typing import TextIO

from common.envelope import RcptState
from common.redisconn import connect
from common.settings import Settings
from common.spool import Spool
from common.store import Store
from worker.jobs import make_context
from worker.sweep import sweep

__all__ = ["cmd_queue", "format_queue"]


def format_queue(store: Store, out: TextIO) -> int:
    total = count = 0
    for msg, statuses in (found for chunk in store.walk() for found in chunk):
        if not count:
            out.write(f"{'-Queue ID-':<22} {'--Size--':>8} {'----Arrival Time----':<20} -Sender/Recipient-------\n")
        count += 1
        env, qid = msg.envelope, msg.envelope.id
        total += len(msg.body)
        mark = "*" if all(s.state is RcptState.PENDING for s in statuses.values()) else " "
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(env.received_at))
        out.write(f"{qid + mark:<22} {len(msg.body):>8} {arrival:<20} {env.sender or 'MAILER-DAEMON'}\n")
        by_reason: dict[str, list[str]] = defaultdict(list)
        for i, r in enumerate(env.recipients):
            st = statuses.get(i)
            if st is None or st.final:
                continue
            by_reason[st.reply if st.state is RcptState.DEFERRED else ""].append(r.address)
        for reason, rcpts in by_reason.items():
            if reason:
                out.write(f"{'':<53}({reason[:200]})\n")
            for a in rcpts:
                out.write(f"{'':<53}{a}\n")
        out.write("\n")
    if not count:
        out.write("Mail queue is empty\n")
        return 0
    out.write(f"-- {total // 1024} Kbytes in {count} Request{'s' if count != 1 else ''}.\n")
    return 0


def cmd_queue(settings: Settings, action: str, ids: list[str], out: TextIO = sys.stdout) -> int:
    spool = Spool.from_settings(settings, connect(settings))
    store = spool.store
    if action == "list":
        return format_queue(store, out)
    if action == "stats":
        jobs = spool.queue.counts()
        counts = {
            "messages in queue": store.queue_size(),
            "jobs waiting": jobs.waiting,
            "jobs running": jobs.running,
            "jobs scheduled (retries)": jobs.scheduled,
            "jobs failed": jobs.failed,
        }
        counts.update({f"total {k}": v for k, v in sorted(store.stats().items())})
        for k, v in counts.items():
            out.write(f"{k:<28} {v}\n")
        return 0
    if action == "flush":
        # like `postqueue -f`: every message with a recipient not yet final, now, per destination
        dests: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for msg, statuses in (found for chunk in store.walk() for found in chunk):
            for d in {
                spool.router.hop(r.address)
                for i, r in enumerate(msg.envelope.recipients)
                if not statuses.get(i) or not statuses[i].final
            }:
                dests[d].append((msg.envelope.id, len(msg.body)))
        queued = spool.queue.enqueue_sized(dests, force=True)
        out.write(f"flushed {queued} message(s) to {len(dests)} destination(s)\n")
        return 0
    if action == "sweep":
        r = sweep(make_context(settings, spool))
        out.write(f"swept {r.messages} message(s): finished {r.finished} left behind, requeued {r.requeued} overdue\n")
        return 0
    if action == "delete":
        if not ids:
            out.write("mtaq queue delete: name the queue ids (`mtaq queue` lists them)\n")
            return 2
        for qid in ids:
            store.delete(qid)
            out.write(f"{qid}: removed\n")
        return 0
    raise AssertionError(action)
