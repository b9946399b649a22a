"""`mtaq queue`: what Postfix's mailq, postqueue, postsuper and qshape do, for mtaq's Redis queue.

Exit codes: 0 done, 1 not found or nothing to do, 2 usage, 3 Redis unreachable. Every error is
one line on stderr with what to do; operations over many messages report progress on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TextIO

import redis

from common.envelope import RcptState, RecipientStatus, domain_of
from common.events import outcome_event
from common.queuerecount import recount, stream_ids
from common.redisconn import connect
from common.replication import ReplicationView
from common.settings import Settings
from common.spool import Spool
from common.store import INDEX, QDESTS, StoreError, dest_key
from common.storeio import reply_text
from mtaq.ops.exporter import Monitor
from mtaq.ops.queueindex import deferred_sample, exact_counts, read_counts, selected_ids
from mtaq.ops.queueview import MessageView, load_views
from mtaq.opscmd import REDIS_SETTINGS, add_settings
from mtaq.queuefmt import list_json, list_lines, parse_age, show_json, show_text, stats_text

__all__ = ["QueueUsage", "add_queue_parser", "cmd_queue", "prune_jobs"]

PROGRESS_EVERY = 500
BOUNCE_REPLY = "message returned to sender by the postmaster (mtaq queue bounce)"


class QueueUsage(Exception):
    """A command line that cannot be carried out as given (exit 2)."""


class NotFound(Exception):
    """Nothing matched (exit 1)."""


# -- the parser --------------------------------------------------------------------------------------
def add_queue_parser(sub: Any) -> None:
    q = sub.add_parser(
        "queue",
        help="the queue: list, stats, show, hold, release, retry, delete, bounce (like mailq, postsuper)",
        description="Inspect and act on the queue. Exit codes: 0 done, 1 not found or nothing to do, "
        "2 usage, 3 Redis unreachable.",
    )
    add_settings(q, REDIS_SETTINGS)
    acts = q.add_subparsers(dest="action", metavar="ACTION")
    routing = (*REDIS_SETTINGS, "relayhost")

    ls = acts.add_parser("list", help="messages with their recipients' state and last reply, like mailq")
    add_settings(ls, routing, nested=True)
    ls.add_argument("--deferred", action="store_true", help="only messages with a deferred recipient")
    ls.add_argument("--hold", action="store_true", help="only messages on hold")
    ls.add_argument("--domain", metavar="D", help="only messages with an open recipient at domain (or next hop) D")
    ls.add_argument("--older-than", metavar="AGE", type=_age, help="only messages older than AGE (30s, 5m, 1h, 2d)")
    ls.add_argument("--json", action="store_true", help="one JSON array, replies whole")

    st = acts.add_parser("stats", help="counts by state, age per destination like qshape, jobs, workers")
    add_settings(st, routing, nested=True)
    st.add_argument("--json", action="store_true", help="one JSON object")
    st.add_argument("--top", type=int, default=20, metavar="N", help="destinations in the table (default 20)")
    st.add_argument(
        "--exact", action="store_true", help="walk the whole queue instead of reading its counters (slow when long)"
    )

    sh = acts.add_parser("show", help="one message: envelope, each recipient's history, headers")
    add_settings(sh, routing, nested=True)
    sh.add_argument("id", help="the queue id (from `mtaq queue list`)")
    sh.add_argument("--json", action="store_true", help="one JSON object")
    sh.add_argument("--body", action="store_true", help="the whole message too")

    hd = acts.add_parser("hold", help="keep messages from delivery, expiry and bounce until released")
    add_settings(hd, routing, nested=True)
    hd.add_argument("ids", nargs="*", metavar="ID", help="queue ids")
    hd.add_argument("--domain", metavar="D", help="every message with an open recipient at D")

    rl = acts.add_parser("release", help="take messages off hold; they are tried again now")
    add_settings(rl, (*routing, "job_max_messages", "job_max_bytes", "job_timeout"), nested=True)
    rl.add_argument("ids", nargs="*", metavar="ID", help="queue ids")
    rl.add_argument("--all", action="store_true", help="every message on hold")

    rt = acts.add_parser("retry", help="deliver deferred mail now (like postqueue -f / -s)")
    add_settings(rt, (*routing, "job_max_messages", "job_max_bytes", "job_timeout"), nested=True)
    rt.add_argument("ids", nargs="*", metavar="ID", help="queue ids")
    rt.add_argument("--domain", metavar="D", help="every message with an open recipient at D")
    rt.add_argument("--all", action="store_true", help="every message not on hold")

    fl = acts.add_parser("flush", help="the same as `retry --all` (postqueue -f)")
    add_settings(fl, (*routing, "job_max_messages", "job_max_bytes", "job_timeout"), nested=True)

    dl = acts.add_parser("delete", help="remove messages without a bounce (asks on a terminal)")
    add_settings(dl, routing, nested=True)
    dl.add_argument("ids", nargs="*", metavar="ID", help="queue ids")
    dl.add_argument("--domain", metavar="D", help="every message with an open recipient at D")
    dl.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    bn = acts.add_parser("bounce", help="return messages to their senders now, with a DSN")
    add_settings(bn, (*routing, "hostname", "job_max_messages", "job_max_bytes", "job_timeout"), nested=True)
    bn.add_argument("ids", nargs="+", metavar="ID", help="queue ids")

    sw = acts.add_parser("sweep", help="find mail whose delivery job was lost and queue it again")
    add_settings(
        sw,
        (*routing, "hostname", "job_max_messages", "job_max_bytes", "job_timeout", "min_backoff", "max_backoff"),
        nested=True,
    )


def _age(text: str) -> float:
    try:
        return parse_age(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- running -----------------------------------------------------------------------------------------
def cmd_queue(settings: Settings, args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    action = args.action or "list"
    try:
        spool = Spool.from_settings(settings, connect(settings, timeout=10.0))
        spool.store.redis.ping()
        return _ACTIONS[action](spool, settings, args, out, err)
    except NotFound as e:
        print(f"mtaq queue {action}: {e}", file=err)
        return 1
    except (redis.ConnectionError, redis.TimeoutError, StoreError, OSError) as e:
        where = settings.redis_url or f"the embedded Redis in {settings.data_dir}"
        print(f"mtaq queue: Redis unreachable at {where} ({e}); is it running? (--redis-url)", file=err)
        return 3


def _views(spool: Spool, ids: Sequence[str] | None = None) -> list[MessageView]:
    return list(load_views(spool.store.redis, spool.router.relayhost, ids=ids))


def _matches_domain(v: MessageView, domain: str) -> bool:
    d = domain.lower().rstrip(".")
    return any(domain_of(r.address) == d or r.destination == domain for r in v.open)


def _select(spool: Spool, args: argparse.Namespace, *, allow_all: bool = True) -> list[MessageView]:
    """The messages named by ids, --domain or --all; NotFound when none."""
    ids: list[str] = list(getattr(args, "ids", None) or [])
    domain = getattr(args, "domain", None)
    every = bool(getattr(args, "all", False))
    if sum(bool(x) for x in (ids, domain, every)) != 1:
        choices = "queue ids, --domain D" + (" or --all" if allow_all else "")
        raise QueueUsage(f"{args.action}: name the messages: {choices} (one of them)")
    if ids:
        views = _views(spool, ids)
        missing = [q for q in ids if q not in {v.qid for v in views}]
        if missing:
            raise NotFound(f"no such message in the queue: {', '.join(missing)} (`mtaq queue list` shows the ids)")
        return views
    views = _views(spool, _domain_ids(spool, domain) if domain else None)
    if domain:
        views = [v for v in views if _matches_domain(v, domain)]
        if not views:
            raise NotFound(f"no message for {domain} in the queue")
    if not views:
        raise NotFound("the queue is empty")
    return views


def _progress(err: TextIO, verb: str, done: int, total: int) -> None:
    if total >= PROGRESS_EVERY and (done % PROGRESS_EVERY == 0 or done == total):
        print(f"{verb} {done}/{total}", file=err, flush=True)


def _domain_ids(spool: Spool, domain: str) -> list[str] | None:
    """The messages with an open recipient at ``domain``, from its index; None (walk) with a
    relayhost, where every destination is the relayhost and the domain only the address says."""
    if spool.router.relayhost:
        return None
    return selected_ids(spool.store.redis, time.time(), domain=domain)


def _listed(spool: Spool, args: argparse.Namespace, now: float) -> Iterator[MessageView]:
    """The views a listing shows, in arrival order, a chunk at a time: the candidates come from
    the smallest index that answers the filters (or the whole queue, streamed), and each view is
    checked against every filter."""
    deferred, hold = bool(getattr(args, "deferred", False)), bool(getattr(args, "hold", False))
    domain, older = getattr(args, "domain", None), getattr(args, "older_than", None)
    r, relayhost = spool.store.redis, spool.router.relayhost
    by_domain = None if relayhost else domain  # with a relayhost the index knows only the relayhost
    ids = selected_ids(r, now, domain=by_domain, deferred=deferred, hold=hold, older_than=older)
    chunks: Iterable[list[str]] = stream_ids(r) if ids is None else _chunked(ids)
    for chunk in chunks:
        for v in load_views(r, relayhost, ids=chunk):
            if deferred and not any(rc.state is RcptState.DEFERRED for rc in v.open):
                continue
            if hold and not v.held:
                continue
            if domain and not _matches_domain(v, domain):
                continue
            if older is not None and not v.age(now) > older:
                continue
            yield v


def _chunked(ids: list[str], chunk: int = 500, first: int = 50) -> Iterator[list[str]]:
    """``ids`` a round trip's worth at a time; the first few alone, so the first lines come at once."""
    yield ids[:first]
    for i in range(first, len(ids), chunk):
        yield ids[i : i + chunk]


def do_list(spool: Spool, settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Streams: the first message is out after one round trip, memory stays one chunk."""
    now = time.time()
    views = _listed(spool, args, now)
    if getattr(args, "json", False):
        out.write("[")
        for n, v in enumerate(views):
            item = json.dumps(list_json([v], now)[0], indent=1, ensure_ascii=False)
            out.write(("," if n else "") + "\n" + item)
        out.write("\n]\n")
        return 0
    filtered = any(getattr(args, k, None) for k in ("deferred", "hold", "domain", "older_than"))
    for n, line in enumerate(list_lines(views, now, empty="no message matches" if filtered else "Mail queue is empty")):
        out.write(line + "\n")
        if n == 1:
            out.flush()  # the first message out now, not when a pipe's buffer fills
    return 0


def throttled(r: redis.Redis) -> list[tuple[str, str, float]]:
    """Destinations with queued mail that the workers marked down after repeated connection failures
    (worker/limits.py, ``mtaq:dest:<d>:down``, while that key lives), with why and for how long:
    one round trip, no SCAN of a keyspace that grows with the queue."""
    pattern = dest_key("*", "down")
    prefix, suffix = pattern.split("*")
    keys = [dest_key(reply_text(d), "down") for d in r.smembers(QDESTS)]
    if not keys:
        return []
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.get(k)
        pipe.pttl(k)
    raw = pipe.execute()
    out = []
    for k, why, ttl in zip(keys, raw[0::2], raw[1::2], strict=True):
        if why is None:
            continue
        reason = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
        out.append((k[len(prefix) : len(k) - len(suffix)], reason, max(0, int(ttl)) / 1000.0))
    return sorted(out)


def prune_jobs(spool: Spool) -> int:
    """Delete waiting and scheduled jobs none of whose messages is still in the queue (deleted,
    bounced, or delivered by a flush before its retry came): they would only run for nothing and
    count in `stats`. Returns how many were deleted."""
    r = spool.store.redis
    dead: list[str] = []
    ids = spool.queue.waiting_job_ids()
    for start in range(0, len(ids), 500):
        jobs = list(spool.queue.jobs(ids[start : start + 500]))
        pipe = r.pipeline(transaction=False)
        for job in jobs:
            for qid in job.ids:
                pipe.zscore(INDEX, qid)
        scores = iter(pipe.execute())
        for job in jobs:
            alive = [next(scores) is not None for _ in job.ids]
            if job.ids and not any(alive):
                dead.append(job.job_id)
    spool.queue.delete_jobs(dead)
    return len(dead)


def do_stats(spool: Spool, settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    r = spool.store.redis
    now = time.time()
    if getattr(args, "exact", False):
        prune_jobs(spool)  # walks every waiting job: only when asked to walk
        views = list(load_views(r, spool.router.relayhost))
        sh = exact_counts(views, now).shape(v for v in views if v.state == "deferred")
    else:
        sh = read_counts(r, now).shape(deferred_sample(r, spool.router.relayhost))
    c = spool.queue.counts()
    jobs = {"waiting": c.waiting, "running": c.running, "scheduled": c.scheduled, "failed": c.failed}
    jobs["pending_messages"] = c.pending  # committed, not yet taken by a drain job (common/jobqueue.py)
    workers = Monitor(r, settings.queue_name).workers()
    down = throttled(r)
    totals = spool.store.stats()
    rep = Monitor(r, settings.queue_name).replication()
    if getattr(args, "json", False):
        doc = {
            **sh.to_json(),
            "jobs": {settings.queue_name: jobs},
            "workers_alive": len(workers),
            "workers": [{"name": w.name, "host": w.hostname, "pid": w.pid, "state": w.state} for w in workers],
            "throttled": [{"destination": d, "reason": why, "seconds_left": t} for d, why, t in down],
            "totals": totals,
            "redis": None if rep is None else _replication_json(rep),
        }
        out.write(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    else:
        out.write(stats_text(sh, jobs, len(workers), totals, down, top=max(1, args.top)))
        if rep is not None:
            out.write("\n".join(rep.lines()) + "\n")
    return 0


def _replication_json(rep: ReplicationView) -> dict[str, object]:
    return {
        "primary": rep.primary,
        "role": rep.role,
        "replicas": [
            {"address": x.address, "state": x.state, "lag_bytes": x.lag_bytes, "lag_seconds": x.lag_seconds}
            for x in rep.replicas
        ],
        "failovers": rep.failovers,
        "last_failover": rep.last_failover,
    }


def _headers(body: bytes) -> list[tuple[str, str]]:
    head = body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    out: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
        elif ":" in line:
            k, _, val = line.partition(":")
            out.append((k, val.strip()))
    return out


def do_show(spool: Spool, settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    views = _views(spool, [args.id])
    msg = spool.store.load(args.id)
    if not views or msg is None:
        raise NotFound(f"no such message in the queue: {args.id} (`mtaq queue list` shows the ids)")
    now = time.time()
    heads = _headers(msg.body)
    if args.json:
        doc = show_json(views[0], heads, msg.body if args.body else None, now)
        out.write(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        return 0
    out.write(show_text(views[0], heads, now))
    if args.body:
        out.write("\n" + msg.body.decode("utf-8", "replace"))
    return 0


def do_hold(spool: Spool, settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    views = _select(spool, args, allow_all=False)
    newly = spool.store.hold([v.qid for v in views])
    out.write(
        f"held {len(newly)} message(s)"
        + (f" ({len(views) - len(newly)} already on hold)" if len(newly) < len(views) else "")
        + "\n"
    )
    return 0 if newly else 1


def _requeue(spool: Spool, views: Iterable[MessageView], err: TextIO, verb: str) -> tuple[int, int]:
    """Delivery jobs now (force: deferred recipients too) for the open recipients of these messages
    that are not on hold; returns (messages, destinations)."""
    dests: dict[str, list[tuple[str, int]]] = defaultdict(list)
    todo = [v for v in views if not v.held]
    for n, v in enumerate(todo, 1):
        # the router's next hops (transport_table included), the ones the workers pick recipients by
        for d in dict.fromkeys(spool.router.hop(r.address) for r in v.open):
            dests[d].append((v.qid, v.size))
        _progress(err, verb, n, len(todo))
    if dests:
        spool.queue.enqueue_sized(dests, force=True)
    return len(todo), len(dests)


def do_release(spool: Spool, settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    store = spool.store
    if args.all and args.ids:
        raise QueueUsage("release: queue ids or --all, not both")
    ids = store.held_ids() if args.all else list(args.ids)
    if not ids:
        if args.all:
            raise NotFound("no message is on hold")
        raise QueueUsage("release: name the messages: queue ids or --all")
    released = set(store.unhold(ids))
    if not released:
        raise NotFound(f"not on hold: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")
    n, d = _requeue(spool, _views(spool, [q for q in ids if q in released]), err, "released")
    out.write(f"released {len(released)} message(s); {n} queued for delivery to {d} destination(s)\n")
    return 0


def do_retry(spool: Spool, settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    views = _select(spool, args)
    held = sum(v.held for v in views)
    n, d = _requeue(spool, views, err, "retried")
    if not n:
        raise NotFound(f"all {held} selected message(s) are on hold: `mtaq queue release` them first")
    out.write(
        f"queued {n} message(s) for delivery now to {d} destination(s)"
        + (f"; {held} on hold left alone" if held else "")
        + "\n"
    )
    return 0


def do_flush(spool: Spool, settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    args.all, args.ids, args.domain = True, [], None
    return do_retry(spool, settings, args, out, err)


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return True
    answer = input(f"{question} [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def do_delete(spool: Spool, settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    views = _select(spool, args, allow_all=False)
    if not args.yes and sys.stdin.isatty() and not _confirm(f"delete {len(views)} message(s) without a bounce?"):
        print("nothing deleted", file=err)
        return 1
    for n, v in enumerate(views, 1):
        spool.store.delete(v.qid)
        _progress(err, "deleted", n, len(views))
    pruned = prune_jobs(spool)
    out.write(
        f"deleted {len(views)} message(s)" + (f"; {pruned} delivery job(s) of them removed" if pruned else "") + "\n"
    )
    return 0


def do_bounce(spool: Spool, settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from worker.finisher import Finisher

    views = _select(spool, args, allow_all=False)
    now = time.time()
    updates: dict[str, dict[int, RecipientStatus]] = {}
    for v in views:
        updates[v.qid] = {
            i: RecipientStatus(
                state=RcptState.BOUNCED,
                attempts=r.status.attempts,
                dsn="5.0.0",
                reply=f"{BOUNCE_REPLY}; last reply: {r.status.reply}" if r.status.reply else BOUNCE_REPLY,
                relay=r.status.relay,
                remote_mta=r.status.remote_mta,
                updated=now,
            )
            for i, r in enumerate(v.recipients)
            if not r.status.final
        }
    spool.store.unhold([v.qid for v in views if v.held])  # a held message may be bounced: it is done
    # with their bounce events (issue 19; no message id: views carry no bodies; never a suppression:
    # the operator's decision says nothing of the address)
    envelopes = {v.qid: v.envelope for v in views}
    entries = [(q, i, st) for q, u in updates.items() for i, st in u.items()]
    spool.store.set_status_list(entries, events=[outcome_event(envelopes[q], i, st, "") for q, i, st in entries])
    finished = [f for f in spool.store.load_many([v.qid for v in views]) if f is not None]
    Finisher.from_settings(settings, spool).finish(finished)
    prune_jobs(spool)
    out.write(f"returned {len(finished)} message(s) to their senders\n")
    return 0


def do_sweep(spool: Spool, settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from worker.finisher import Finisher
    from worker.sweep import sweep

    r = sweep(spool, Finisher.from_settings(settings, spool), settings.job_timeout)
    out.write(f"swept {r.messages} message(s): finished {r.finished} left behind, requeued {r.requeued} overdue\n")
    # the sweep's walk recounted too; while it repaired something the totals wait for a walk that
    # changed nothing (common/queuerecount.Recount): at most two more walks, envelopes only
    rc = r.recount
    for _ in range(2):
        if rc is None or rc.applied:
            break
        rc = recount(spool.store, spool.router.hop)
    if rc is not None:
        fixed = ", ".join(f"{k} off by {v}" for k, v in sorted(rc.drift.items())) or "none off"
        state = "corrected" if rc.applied else "not checked: the queue kept changing, the next sweep tries again"
        out.write(f"counters: {rc.repaired} message(s) repaired, {rc.removed} stray index entries; {fixed} ({state})\n")
    return 0


_ACTIONS: dict[str, Callable[[Spool, Settings, argparse.Namespace, TextIO, TextIO], int]] = {
    "list": do_list,
    "stats": do_stats,
    "show": do_show,
    "hold": do_hold,
    "release": do_release,
    "retry": do_retry,
    "flush": do_flush,
    "delete": do_delete,
    "bounce": do_bounce,
    "sweep": do_sweep,
}
