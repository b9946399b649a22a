"""`mtaq queue` and `mtaq health` against a real redis-server, with a real ingress and worker over
TCP, a DNS server on loopback and sinks that accept, defer and refuse: a queue in known states
(deferred to several destinations, held, bounced, delivered), checked in the table, the JSON and
the exit codes; a hold honoured by the running worker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from rq.job import Job

from common.jobqueue import DeliveryQueue
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, ROOT, message, route
from tests.integration.eventually import GENEROUS
from tests.ports import free_port
from tests.sinks import SinkServer, wait_for

LONG = "451 4.3.0 " + "the remote is busy right now and would like you to come back a little later " * 3


def mtaq(mta: MTA, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtaq", *args],
        env=mta.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )


def listing(mta: MTA, *args: str) -> list[dict[str, Any]]:
    r = mtaq(mta, "queue", "list", "--json", *args)
    assert r.returncode == 0, r.stderr
    out: list[dict[str, Any]] = json.loads(r.stdout)
    return out


def jobs_idle(mta: MTA) -> bool:
    r = mtaq(mta, "queue", "stats", "--json")
    jobs = json.loads(r.stdout)["jobs"]["mtaq"]
    return bool(jobs["waiting"] == 0 and jobs["running"] == 0)


def states(mta: MTA, qid: str) -> dict[str, str]:
    for m in listing(mta):
        if m["id"] == qid:
            return {r["address"]: r["state"] for r in m["recipients"]}
    return {}


@pytest.mark.slow
def test_queue_commands_on_a_queue_in_known_states(
    mta_factory: Callable[..., MTA], dns: ZoneServer, sinks: Callable[..., SinkServer]
) -> None:
    route(dns, "ok.test", "127.0.0.2")
    route(dns, "later.test", "127.0.0.3")
    route(dns, "never.test", "127.0.0.4")
    route(dns, "down.test", "127.0.0.5")  # nothing listens there: connection refused
    ok = sinks("127.0.0.2")
    sinks("127.0.0.3").rcpt_default = LONG
    sinks("127.0.0.4").rcpt_default = "550 5.1.1 no such user"
    mta = mta_factory()
    mta.start_ingress()
    mixed = mta.send("alice@ok.test", ["a@later.test", "b@never.test", "c@ok.test"], message("mixed"))
    down = mta.send("alice@ok.test", ["x@down.test"], message("down"))
    kept = mta.send("alice@ok.test", ["k@ok.test"], message("kept"))

    # hold before any worker runs: its job is already queued, and the worker must skip it
    r = mtaq(mta, "queue", "hold", kept)
    assert (r.returncode, r.stdout.strip()) == (0, "held 1 message(s)"), r.stderr
    assert mtaq(mta, "queue", "hold", kept).returncode == 1  # nothing to do: already held
    mta.start_worker()
    assert wait_for(lambda: states(mta, mixed).get("a@later.test") == "deferred", GENEROUS), mta.logs()
    assert wait_for(lambda: states(mta, down).get("x@down.test") == "deferred", GENEROUS), mta.logs()
    assert wait_for(lambda: jobs_idle(mta), GENEROUS), mta.logs()
    assert states(mta, mixed) == {"a@later.test": "deferred", "b@never.test": "bounced", "c@ok.test": "delivered"}
    assert states(mta, kept) == {"k@ok.test": "pending"}
    assert ok.recipients() == ["c@ok.test"], "the held message was delivered"
    # and again with the worker running: a forced job for the held message changes nothing
    dq = DeliveryQueue(mta.redis)
    dq.enqueue_now("ok.test", [kept], force=True)
    job_ids = dq.rq.get_job_ids()
    # result_ttl is 0: a job that ran is gone (a failed one would stay, in the failed registry)
    assert wait_for(lambda: not any(Job.exists(j, connection=mta.redis) for j in job_ids), GENEROUS), mta.logs()
    assert states(mta, kept) == {"k@ok.test": "pending"} and ok.recipients() == ["c@ok.test"]

    # the table: like mailq, 100 columns, long replies cut with …, the hold marked with !
    r = mtaq(mta, "queue", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("-Queue ID-")
    assert all(len(line) <= 100 for line in lines), [line for line in lines if len(line) > 100]
    assert any(line.startswith(kept + "!") for line in lines)
    assert any("held (pending)" in line and "k@ok.test" in line for line in lines)
    reply_lines = [line for line in lines if "said: 451 4.3.0 the r" in line]
    assert reply_lines and reply_lines[0].rstrip().endswith("…)")
    assert "(connect to mx.down.test[127.0.0.5]" in r.stdout
    assert "b@never.test" not in r.stdout and "c@ok.test" not in r.stdout  # final: not waiting
    assert lines[-1] == "-- 0 Kbytes in 3 Requests."
    # the JSON: every recipient, replies whole
    whole = listing(mta)
    assert [m["id"] for m in whole] == [mixed, down, kept]
    later = next(x for x in whole[0]["recipients"] if x["address"] == "a@later.test")
    assert later["reply"].endswith(LONG.strip()) and later["dsn"] == "4.3.0" and later["attempts"] == 1
    assert [m["state"] for m in whole] == ["deferred", "deferred", "held"]
    # filters
    assert [m["id"] for m in listing(mta, "--deferred")] == [mixed, down]
    assert [m["id"] for m in listing(mta, "--hold")] == [kept]
    assert [m["id"] for m in listing(mta, "--domain", "down.test")] == [down]
    assert listing(mta, "--older-than", "1h") == []

    # stats: counts by state, qshape per destination, jobs, workers
    r = mtaq(mta, "queue", "stats")
    assert r.returncode == 0, r.stderr
    assert "1 active" not in r.stdout and "2 deferred, 1 held" in r.stdout
    head = next(line for line in r.stdout.splitlines() if line.startswith("destination"))
    assert head.split() == ["destination", "total", "0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80-160m", "older"]
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.split()[:1]}
    assert rows["later.test"][:2] == ["1", "1"] and rows["down.test"][:2] == ["1", "1"] and rows["ok.test"][0] == "1"
    assert "workers alive: 1" in r.stdout
    assert all(len(line) <= 100 for line in r.stdout.splitlines())
    doc = json.loads(mtaq(mta, "queue", "stats", "--json").stdout)
    assert doc["by_state"] == {"active": 0, "deferred": 2, "held": 1}
    assert doc["deferred_destinations"] == ["down.test", "later.test"]
    assert doc["workers_alive"] == 1 and doc["jobs"]["mtaq"]["scheduled"] == 2  # the two retries

    # show: envelope, per-recipient history, headers
    r = mtaq(mta, "queue", "show", mixed)
    assert r.returncode == 0, r.stderr
    assert "<b@never.test> via never.test: bounced, 1 attempt(s)" in r.stdout
    assert "(host mx.never.test[127.0.0.4]" in r.stdout and "Subject: mixed" in r.stdout
    shown = json.loads(mtaq(mta, "queue", "show", mixed, "--json", "--body").stdout)
    assert shown["envelope"]["helo"] == "client.test" and "hello" in shown["body"]

    # bad input: one line, the right exit code, never a traceback
    for argv, code in (
        (["queue", "show", "NOSUCHID"], 1),
        (["queue", "delete", "--yes", "NOSUCHID"], 1),
        (["queue", "retry"], 2),
        (["queue", "release", "NOSUCHID"], 1),
        (["queue", "list", "--older-than", "soon"], 2),
        (["queue", "stats", "--redis-url", "redis://127.0.0.1:1/0"], 3),
        (["queue", "--redis-url", "redis://127.0.0.1:1/0"], 3),
    ):
        r = mtaq(mta, *argv)
        assert r.returncode == code, (argv, r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
    assert "NOSUCHID" in mtaq(mta, "queue", "delete", "--yes", "NOSUCHID").stderr

    # release: the held message goes out now
    r = mtaq(mta, "queue", "release", kept)
    assert r.returncode == 0 and r.stdout.startswith("released 1 message(s)"), r.stderr
    assert wait_for(lambda: "k@ok.test" in ok.recipients(), GENEROUS), mta.logs()

    # bounce: returned to the sender now, with a DSN (to alice@ok.test, the sink)
    r = mtaq(mta, "queue", "bounce", down)
    assert (r.returncode, r.stdout.strip()) == (0, "returned 1 message(s) to their senders"), r.stderr
    assert wait_for(lambda: "alice@ok.test" in ok.recipients(), GENEROUS), mta.logs()
    dsn = next(m for m in ok.messages if m[1] == ["alice@ok.test"])[2]
    assert b"multipart/report" in dsn and b"x@down.test" in dsn

    # retry --all, then delete: no job of a deleted message lingers in the counts
    r = mtaq(mta, "queue", "retry", "--all")
    assert r.returncode == 0 and "queued 1 message(s)" in r.stdout, (r.stdout, r.stderr)
    assert wait_for(lambda: jobs_idle(mta), GENEROUS)
    r = mtaq(mta, "queue", "delete", mixed)  # not a terminal: no question asked
    assert r.returncode == 0 and r.stdout.startswith("deleted 1 message(s)"), r.stderr
    doc = json.loads(mtaq(mta, "queue", "stats", "--json").stdout)
    assert doc["messages"] == 0 and doc["jobs"]["mtaq"] == {
        "waiting": 0,
        "running": 0,
        "scheduled": 0,
        "failed": 0,
        "pending_messages": 0,
    }
    r = mtaq(mta, "queue")
    assert (r.returncode, r.stdout) == (0, "Mail queue is empty\n")
    r = mtaq(mta, "queue", "retry", "--all")
    assert r.returncode == 1 and r.stderr.strip() == "mtaq queue retry: the queue is empty"


def test_health_names_each_failure(mta_factory: Callable[..., MTA]) -> None:
    mport = free_port()
    mta = mta_factory(metrics_listen=f"127.0.0.1:{mport}")  # the ingress serves metrics too
    r = mtaq(mta, "health")
    assert r.returncode == 1
    assert "ingress: FAILED" in r.stderr and "worker: FAILED" in r.stderr and "redis: ok" in r.stdout
    mta.start_ingress()
    mta.start_worker()
    assert wait_for(lambda: mtaq(mta, "health").returncode == 0, GENEROUS), mtaq(mta, "health").stderr
    doc = json.loads(mtaq(mta, "health", "--json").stdout)
    assert doc["ok"] is True and [c["name"] for c in doc["checks"]][:3] == ["redis", "ingress", "worker"]
    assert "220" in doc["checks"][1]["detail"]
    assert mtaq(mta, "health", "--check", "metrics").returncode == 0  # `mtaq ingress` serves /metrics
    mta.stop("worker0")
    assert wait_for(lambda: mtaq(mta, "health").returncode == 1, GENEROUS)
    assert mtaq(mta, "health", "--check", "redis", "--check", "ingress").returncode == 0
    r = mtaq(mta, "health", "--redis-url", "redis://127.0.0.1:1/0")
    assert r.returncode == 3 and "redis: FAILED" in r.stderr and "Traceback" not in r.stderr
