"""What a test prints about the messages still queued when it expected an empty queue: each one's
recipients, leases and every RQ job that names it (with the job's status and registry), and the
log lines that mention it. The chaos tests fail with this instead of a bare count, so that a
failure seen once in CI says where the message was stuck."""

from __future__ import annotations

import json
import zlib

import redis

from common.store import INDEX, PREFIX, left_key, rcpt_key

__all__ = ["describe_stuck"]

_REGISTRIES = ("started", "scheduled", "failed", "finished", "deferred", "canceled")


def _text(x: bytes | str) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else x


def _jobs_naming(r: redis.Redis, qid: str) -> list[str]:
    found = []
    for key in r.scan_iter("rq:job:*", count=1000):
        name = _text(key)
        if name.count(":") != 2:  # rq:job:<id> only, not its executions or dependents
            continue
        raw = r.hget(key, "data")
        if not isinstance(raw, bytes):
            continue
        try:
            data = zlib.decompress(raw)  # RQ compresses a job's function and arguments
        except zlib.error:
            data = raw
        if qid.encode() not in data:
            continue
        job_id = name.rsplit(":", 1)[1]
        status = _text(r.hget(key, "status") or b"?")
        where = [reg for reg in _REGISTRIES if r.zscore(f"rq:{reg}:mtaq", job_id) is not None]
        running = [_text(m) for m in r.zrange("rq:wip:mtaq", 0, -1) if isinstance(m, bytes | str)]
        where += [f"wip:{m}" for m in running if m.startswith(job_id)]
        queued = job_id.encode() in r.lrange("rq:queue:mtaq", 0, -1)
        retries = _text(r.hget(key, "retries_left") or b"?")
        found.append(
            f"job {job_id} status={status} retries_left={retries} registries={where or '-'}"
            f"{' in the queue' if queued else ''} data={_text(data)[:160]}"
        )
    return found


def describe_stuck(r: redis.Redis, logs: str, limit: int = 3) -> str:
    """A few lines per queued message (at most ``limit`` messages)."""
    ids = [_text(x) for x in r.zrange(INDEX, 0, limit - 1) if isinstance(x, bytes | str)]
    lines = []
    for qid in ids:
        rcpts = {_text(k): json.loads(v) for k, v in r.hgetall(rcpt_key(qid)).items()}
        states = {k: (v.get("s"), v.get("n"), v.get("x")) for k, v in rcpts.items()}  # state, attempts, next
        leases = {_text(k): _text(r.get(k) or b"") for k in r.scan_iter(f"{PREFIX}lease:{qid}:*")}
        lines.append(f"{qid}: left={_text(r.get(left_key(qid)) or b'-')} recipients={states} leases={leases}")
        lines += ["  " + j for j in _jobs_naming(r, qid)] or ["  no RQ job names it"]
        lines += ["  log: " + ln for ln in logs.splitlines() if qid in ln][-15:]
    return "\n".join(lines)
