"""The benchmark harness's pure parts: percentiles, /proc parsing, the table and the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.measure import CLK_TCK, Stat, by_role, parse_pss_kib, parse_stat, percentile, role_of, tree
from bench.report import (
    SCHEMA,
    Result,
    medians,
    public_path,
    ratios,
    render_medians,
    render_table,
    result_json,
    rows,
)
from bench.sinkdump import parse_sent_ns
from bench.slowdest import transports, verdict, zone


def test_percentile_interpolates_between_closest_ranks() -> None:
    xs = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_parse_stat_counts_fields_after_the_last_parenthesis() -> None:
    # a command name with spaces and parentheses; utime 100, stime 50, cutime 7, cstime 3
    text = "4242 (smtpd (x) y) S 4000 4000 4000 0 -1 4194304 100 0 0 0 100 50 7 3 20 0 1 0 42855 3133440 409"
    assert parse_stat(text) == Stat(pid=4242, ppid=4000, ticks=160)


def test_parse_pss_reads_the_pss_line_only() -> None:
    rollup = (
        "5638264ec000-7ffd20e24000 ---p 00000000 00:00 0    [rollup]\n"
        "Rss:                1756 kB\nPss:                 345 kB\nPss_Dirty:           108 kB\n"
        "Pss_Anon:            108 kB\nSwapPss:               0 kB\n"
    )
    assert parse_pss_kib(rollup) == 345
    assert parse_pss_kib("") == 0


def test_tree_follows_parents_and_skips_other_processes() -> None:
    stats = {p: Stat(p, pp, 1) for p, pp in [(1, 0), (10, 1), (11, 10), (12, 10), (13, 11), (20, 1)]}
    assert set(tree([10], stats)) == {10, 11, 12, 13}
    assert tree([99], stats) == {}


def test_parse_sent_ns_finds_the_stamp_among_headers() -> None:
    head = b"X-Client-Addr: 127.0.0.1\nReceived: from x\n\tby y; Thu, 3 Dec 2026\nX-Bench-Sent: 1796303841261914379\n"
    assert parse_sent_ns(head) == 1796303841261914379
    assert parse_sent_ns(b"X-Bench-Sent: 12\r\nSubject: s\r\n") == 12
    assert parse_sent_ns(b"Subject: X-Bench-Sent: 12\n") is None  # only a header line of its own


def _result(system: str, ingress: float, e2e: float | None, pss: float, *, run: int = 1) -> Result:
    return Result(
        load="smtp-source",
        system=system,
        messages=1000,
        accepted=1000,
        delivered=None if e2e is None else 1000,
        ingress_s=1000 / ingress,
        e2e_s=None if e2e is None else 1000 / e2e,
        latencies=[] if e2e is None else [0.010, 0.020, 0.030],
        cpu_s=3.0,
        peak_pss_mib=pss,
        peak_procs=5,
        run=run,
    )


def test_ratios_are_to_postfix_in_the_same_run_and_load() -> None:
    rs = [_result("postfix", 500, 400, 200), _result("mtaq", 750, 200, 100), _result("aiosmtpd sink", 2000, None, 20)]
    rs.append(_result("mtaq", 1000, 800, 100, run=2))  # no Postfix in run 2: no ratios
    x = ratios(rs)
    assert x[(1, "smtp-source", "mtaq")] == {
        "ingress_msgs_s": 1.5,
        "e2e_msgs_s": 0.5,
        "cpu_s_per_1000": 1.0,
        "peak_pss_mib": 0.5,
    }
    assert x[(1, "smtp-source", "aiosmtpd sink")]["e2e_msgs_s"] is None
    assert x[(2, "smtp-source", "mtaq")]["ingress_msgs_s"] is None


def test_table_has_a_row_per_system_with_figures_and_ratios() -> None:
    rs = [_result("postfix", 500, 400, 200), _result("mtaq", 750, 200, 100), _result("aiosmtpd sink", 2000, None, 20)]
    text = render_table(rs, {"smtp-source": "smtp-source, a new connection per message"})
    lines = text.splitlines()
    assert "smtp-source, a new connection per message" in lines
    mtaq = next(line for line in lines if line.startswith("mtaq"))
    assert mtaq.split() == ["mtaq", "750", "200", "20", "30", "3.00", "100", "1.50", "0.50", "1.00", "0.50"]
    sink = next(line for line in lines if line.startswith("aiosmtpd sink"))
    assert sink.split()[3:7] == ["-", "-", "-", "3.00"]  # no delivery, no latency


def test_result_json_shape() -> None:
    meta = {"host": {"cpus": 2}, "versions": {"postfix": "3.7.11"}, "params": {"messages": 1000}}
    doc = result_json(meta, [_result("postfix", 500, 400, 200), _result("mtaq", 750, 200, 100)])
    doc = json.loads(json.dumps(doc))  # serialisable as it is
    assert doc["schema"] == SCHEMA and doc["host"]["cpus"] == 2 and doc["versions"]["postfix"] == "3.7.11"
    mtaq = doc["results"][1]
    assert {
        "run",
        "load",
        "system",
        "accepted",
        "delivered",
        "ingress_msgs_s",
        "e2e_msgs_s",
        "latency_p50_ms",
        "latency_p99_ms",
        "latency_samples",
        "cpu_s_per_1000",
        "peak_pss_mib",
        "vs_postfix",
    } <= set(mtaq)
    assert mtaq["latency_p50_ms"] == 20.0 and mtaq["latency_samples"] == 3
    assert mtaq["vs_postfix"]["e2e_msgs_s"] == 0.5


def test_slow_destination_zone_and_postfix_routes_name_the_same_servers() -> None:
    z = zone(2)
    assert z["d1.slow.test."] == [("MX", "10 mx.d1.slow.test.")]
    assert z["mx.d1.slow.test."] == [("A", "127.0.0.11")]
    assert transports(2525, 2) == {"d0.slow.test": "smtp:[127.0.0.10]:2525", "d1.slow.test": "smtp:[127.0.0.11]:2525"}


def test_verdict_applies_issue_8s_bar() -> None:
    rs = [_result("postfix", 500, 100, 200), _result("mtaq", 500, 120, 390)]
    assert "meets the bar" in verdict(rs)[0]
    rs = [_result("postfix", 500, 100, 200), _result("mtaq", 500, 120, 410)]
    assert "misses the bar" in verdict(rs)[0]


def test_medians_take_each_runs_ratio_then_the_median() -> None:
    rs = [_result("postfix", 500, 400, 200, run=n) for n in (1, 2, 3)]
    rs += [_result("mtaq", v, 2 * v, 100, run=n) for n, v in ((1, 1000), (2, 400), (3, 600))]
    m = {x["system"]: x for x in medians(rows(rs))}["mtaq"]
    assert m["runs"] == 3 and m["ingress_msgs_s"] == 600.0 and m["x_ingress_msgs_s"] == 1.2
    assert m["e2e_msgs_s"] == 1200.0 and m["x_e2e_msgs_s"] == 3.0 and m["x_peak_pss_mib"] == 0.5
    assert "1.20" in render_medians(rows(rs))


def test_public_path_hides_the_machines_directories(tmp_path: Path) -> None:
    (tmp_path / "co" / ".git").mkdir(parents=True)
    assert public_path(tmp_path / "co" / ".venv" / "bin" / "mtaq") == ".venv/bin/mtaq"
    assert public_path(tmp_path / "elsewhere" / "mtaq") == "mtaq"


def test_cpu_by_process_role_and_per_message() -> None:
    assert role_of(["/v/.venv/bin/python", "-m", "mtaq", "ingress"], "python") == "mtaq ingress"
    assert role_of(["/v/.venv/bin/mtaq", "run"], "mtaq") == "mtaq run"
    assert role_of(["redis-server", "unixsocket:/q/redis.sock"], "redis-server") == "redis-server"
    assert role_of(["smtpd", "-n", "smtp", "-t", "inet"], "smtpd") == "smtpd"
    # two workers summed; one started in between counts from 0; a pid reused by another role too
    start = {1: ("mtaq worker", 100), 2: ("mtaq worker", 50), 3: ("mtaq ingress", 10), 9: ("smtpd", 5)}
    end = {1: ("mtaq worker", 300), 2: ("mtaq worker", 150), 3: ("mtaq ingress", 210), 4: ("smtpd", 7), 9: ("x", 4)}
    got = by_role(start, end)
    assert got == {"mtaq worker": 300 / CLK_TCK, "mtaq ingress": 200 / CLK_TCK, "smtpd": 7 / CLK_TCK, "x": 4 / CLK_TCK}
    # a child alive at the start that died: its whole life is in its parent's c-fields at the end,
    # so the parent's role gives back what the first look had counted of it already
    start = {1: ("master", 100), 5: ("smtpd", 30)}
    end = {1: ("master", 100 + 30 + 20)}  # the child spent 20 more, then was reaped
    assert by_role(start, end, {1: 0, 5: 1}) == {"master": 20 / CLK_TCK}
    assert by_role(start, end) == {"master": 50 / CLK_TCK}  # without its parent: as before
    r = _result("mtaq", 750, 200, 100)
    r.cpu_by_role = {"redis-server": 0.1, "mtaq ingress": 0.3}
    assert r.cpu_ms_per_message() == {"mtaq ingress": 0.3, "redis-server": 0.1}  # largest first
    assert list(r.figures()["cpu_ms_per_msg_by_process"]) == ["mtaq ingress", "redis-server"]
    rows_ = medians(
        [
            {
                **r.figures(),
                "vs_postfix": dict.fromkeys(("ingress_msgs_s", "e2e_msgs_s", "cpu_s_per_1000", "peak_pss_mib")),
            }
        ]
    )
    assert rows_[0]["cpu_ms_per_msg_by_process"] == {"mtaq ingress": 0.3, "redis-server": 0.1}


def test_the_sink_writes_on_tmpfs_when_there_is_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import sinkdump

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(sinkdump, "TMPFS", shm)
    got = sinkdump._dump_dir(tmp_path / "run" / "sink")
    assert got.name == "sink" and got.parent.parent == shm  # a fresh directory of its own there
    monkeypatch.setattr(sinkdump, "TMPFS", tmp_path / "none")
    assert sinkdump._dump_dir(tmp_path / "run" / "sink") == tmp_path / "run" / "sink"
