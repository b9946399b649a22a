"""bench/ceiling.py and bench/rediscost.py: options, the arithmetic of the ceiling, and the phases a
MONITOR feed is sorted into."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.ceiling import Row, ceiling_table, parse_args, verdict
from bench.rediscost import Cost, Tally, classify, diff_commandstats, parse_monitor_line
from bench.report import Result


def result(workers: int, delivered: int, e2e_s: float) -> Result:
    return Result("ceiling", f"mtaq w{workers}", delivered, delivered, delivered, 1.0, e2e_s, [], 1.0, 100.0, 3)


def test_options() -> None:
    a = parse_args(["--workers", "4,1,2,2"])
    assert a.workers == [1, 2, 4] and a.messages == 800 and a.conversations == 10
    with pytest.raises(SystemExit):
        parse_args(["--workers", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--workers", "one"])


def test_the_ceiling_is_one_core_over_the_cpu_per_message() -> None:
    cost = Cost(Counter({"hset": 3000, "evalsha": 1000}), cpu_s=0.5)
    f = cost.per_message(1000)
    assert f == {"commands_per_msg": 4.0, "cpu_ms_per_msg": 0.5, "one_core_msgs_s": 2000}
    assert Cost(Counter(), 0.0).per_message(0)["one_core_msgs_s"] == 0  # nothing measured: no ceiling


def test_what_redis_costs_idle_is_taken_out_as_its_share_of_the_load_s_time() -> None:
    # 1,000 messages in 20 s; idle, Redis spent 2 ms a second and ran 20 commands a second
    cost = Cost(Counter({"hset": 12_000}), cpu_s=0.5, seconds=20.0, idle_cpu_s_per_s=0.002, idle_commands_per_s=20.0)
    f = cost.per_message(1000)
    assert f["idle_cpu_ms_per_msg"] == 0.04 and f["idle_commands_per_msg"] == 0.4 and f["idle_cpu_ms_per_s"] == 2.0
    assert f["marginal_cpu_ms_per_msg"] == 0.46 and f["marginal_one_core_msgs_s"] == round(1000 / 0.46)
    assert f["cpu_ms_per_msg"] == 0.5, "the figure judged stays the whole cost"
    table = ceiling_table([Row(4, result(4, 1000, 20.0), cost)])
    assert table.splitlines()[1].split()[-4:] == ["2.0", "0.46", "11.6", str(round(1000 / 0.46))]
    assert "idle" not in Cost(Counter(), 0.5).per_message(1000), "not measured: not reported"


def test_the_table_scales_against_one_worker_and_judges_the_largest() -> None:
    rows = [
        Row(1, result(1, 800, 80.0), Cost(Counter({"get": 40_000}), 0.8)),
        Row(4, result(4, 800, 20.0), Cost(Counter({"get": 8_000}), 0.2)),
    ]
    table = ceiling_table(rows)
    assert "4.00x" in table.splitlines()[2] and "4000" in table.splitlines()[2]
    (line,) = verdict(rows)
    assert "4 workers: 10.0 commands and 0.25 ms" in line and "meets" in line
    rows[1].cost = Cost(Counter({"get": 16_000}), 0.2)
    assert "misses" in verdict(rows)[0]


def test_commandstats_difference_leaves_out_our_info() -> None:
    before = {"cmdstat_hset": {"calls": 10, "usec": 5}, "cmdstat_info": {"calls": 3, "usec": 1}}
    after = {
        "cmdstat_hset": {"calls": 25, "usec": 9},
        "cmdstat_info": {"calls": 4, "usec": 2},
        "cmdstat_get": {"calls": 2, "usec": 1},
    }
    assert diff_commandstats(before, after) == Counter({"hset": 15, "get": 2})


def test_monitor_lines_parse() -> None:
    assert parse_monitor_line('1700000000.1 [0 unix:/x/redis.sock] "HSET" "mtaq:msg:A" "env" "{\\"a\\"}"') == (
        False,
        "HSET",
        ["mtaq:msg:A", "env", '{\\"a\\"}'],
    )
    assert parse_monitor_line('1700000000.2 [0 lua] "DECR" "mtaq:left:A"') == (True, "DECR", ["mtaq:left:A"])
    assert parse_monitor_line("OK") is None


def test_phases_by_command_and_key() -> None:
    assert classify("HSET", ["mtaq:msg:A", "env", "x", "body", "y"]) == "ingress commit"
    assert classify("HMGET", ["mtaq:msg:A", "env", "body"]) == "worker load+lease"
    assert classify("HSET", ["rq:job:1", "created_at", "t", "data", "d"]) == "RQ enqueue"
    assert classify("HSET", ["rq:job:1", "last_heartbeat", "t"]) == "heartbeat+maintenance"
    assert classify("ZADD", ["rq:wip:mtaq", "1.0", "1:e"]) == "RQ dequeue+start"
    assert classify("ZADD", ["rq:wip:mtaq", "XX", "1.0", "1:e"]) == "heartbeat+maintenance"
    assert classify("ZREM", ["rq:wip:mtaq", "1:e"]) == "RQ finish"
    assert classify("SET", ["mtaq:recovery-lock:mtaq", "w", "NX", "EX", "30"]) == "heartbeat+maintenance"
    shared = ["mtaq:stats", "mtaq:queue:counts", "mtaq:hold", "mtaq:queue:deferred", "mtaq:queue:dests"]
    outcome = [*shared, "mtaq:events", "mtaq:index", "mtaq:rcpt:A", "mtaq:left:A", "mtaq:msg:A", "mtaq:index"]
    assert classify("EVALSHA", ["sha", "11", *outcome]) == "outcome write"
    assert classify("EVALSHA", ["sha", "1", "mtaq:lease:A:d", "token", "30000"]) == "heartbeat+maintenance"
    assert classify("EVALSHA", ["sha", "1", "mtaq:lease:A:d", "token"]) == "worker load+lease"
    job = ["mtaq:leases:d", "mtaq:holder:t", "t", "20000", "mtaq:holder:", "86400000", "A", "B"]
    assert classify("EVALSHA", ["sha", "2", *job]) == "worker load+lease"  # a job's leases taken
    assert classify("PEXPIRE", ["mtaq:holder:t", "20000"]) == "heartbeat+maintenance"  # pushed on
    assert classify("HINCRBY", ["mtaq:queue:counts", "r:active", "-1"], "outcome write") == "queue counters"
    assert classify("XADD", ["mtaq:events", "MAXLEN", "~", "1000", "*"], "outcome write") == "events"
    assert classify("HSET", ["mtaq:rcpt:A", "0", "{}"], "outcome write") == "outcome write"
    # the drain jobs' scripts (common/jobqueue.py): the RQ job they queue is RQ's enqueue
    assert classify("EVALSHA", ["sha", "3", "mtaq:armed", "mtaq:pend-count", "mtaq:pend:d"]) == "RQ enqueue"
    draw = ["sha", "5", "mtaq:pend:d", "mtaq:armed", "mtaq:pend-count", "mtaq:drawn:J", "mtaq:drawn-avg"]
    assert classify("EVALSHA", draw) == "RQ dequeue+start"
    assert classify("LTRIM", ["mtaq:pend:d", "2", "-1"], "RQ dequeue+start") == "RQ dequeue+start"
    assert classify("RPUSH", ["rq:queue:mtaq", "J"], "RQ dequeue+start") == "RQ enqueue"
    assert classify("DEL", ["mtaq:drawn:J"]) == "RQ finish"
    assert classify("GET", ["mtaq:pend-count"]) == "ingress flow control"
    assert classify("GET", ["mtaq:drawn-avg"]) == "ingress flow control"


def test_a_tally_gives_transactions_and_expiries_their_neighbours_phase() -> None:
    t = Tally()
    feed = [
        '1.0 [0 unix:/s] "MULTI"',
        '1.1 [0 unix:/s] "EXEC"',
        '1.2 [0 unix:/s] "HSET" "mtaq:msg:A" "env" "e"',
        '1.3 [0 unix:/s] "RPUSH" "rq:queue:mtaq" "1"',
        '1.4 [0 unix:/s] "EVALSHA" "sha" "2" "mtaq:stats" "mtaq:queue:counts" "1" "0" "{}"',
        '1.5 [0 lua] "HGET" "mtaq:rcpt:A" "0"',
        '1.6 [0 lua] "HINCRBY" "mtaq:queue:counts" "r:active" "-1"',
        '1.7 [0 unix:/s] "HSET" "rq:execution:1:e" "id" "e"',
        '1.8 [0 unix:/s] "EXPIRE" "rq:execution:1:e" "20"',
    ]
    for line in feed:
        t.add_line(line)
    assert t.client == Counter({"ingress commit": 3, "RQ enqueue": 1, "outcome write": 1, "RQ dequeue+start": 2})
    assert t.lua == Counter({"outcome write": 1, "queue counters": 1})
    rows = {p: (c, x) for p, c, x in t.rows(2)}
    assert rows["ingress commit"] == (1.5, 0.0) and rows["queue counters"] == (0.0, 0.5)
