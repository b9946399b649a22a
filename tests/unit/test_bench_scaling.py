"""bench/scaling.py and bench/backlog.py: the pure parts (option parsing, the plan of loads and
systems, relabelling, medians of ratios, the memory-per-message arithmetic)."""

from __future__ import annotations

import pytest

from bench.backlog import backlog_body, memory_per_message, zone
from bench.report import Result, medians, rows
from bench.scaling import (
    GRID_LOADS,
    describe,
    grid_cases,
    grid_variants,
    in_order,
    memory_table,
    parse_args,
    relabel,
    size_cases,
    size_plan,
)


def test_defaults_run_every_part_once() -> None:
    a = parse_args([])
    assert a.parts == ["grid", "sizes", "backlog"]
    assert (a.runs, a.messages, a.backlog, a.sessions) == (1, 2000, 100_000, 20)


def test_options_are_parsed() -> None:
    a = parse_args(["--parts", "backlog,grid", "--runs", "3", "--messages", "1000", "--backlog", "20000"])
    assert (a.parts, a.runs, a.messages, a.backlog) == (["backlog", "grid"], 3, 1000, 20000)


@pytest.mark.parametrize("argv", [["--parts", "grid,speed"], ["--parts", ","]])
def test_an_unknown_part_is_one_line_naming_the_choices(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="choose from grid, sizes, backlog"):
        parse_args(argv)


@pytest.mark.parametrize("argv", [["--runs", "0"], ["--messages", "0"], ["--backlog", "-1"], ["--timeout", "0"]])
def test_non_positive_counts_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and "must be positive" in capsys.readouterr().err


def test_the_grid_is_every_worker_count_with_every_ingress_count() -> None:
    vs = grid_variants()
    assert [v.name for v in vs] == [f"mtaq w{w} p{p}" for p in (1, 2) for w in (1, 2, 4)]
    assert vs[-1].env == {"MTAQ_WORKERS": "4", "MTAQ_PROCESSES": "2"}
    cases = grid_cases(parse_args(["--messages", "500"]))
    assert [(c.label, c.load.kind, c.load.size, c.load.messages) for c in cases] == [
        (f"grid {k}", k, 4096, 500) for k in GRID_LOADS
    ]


def test_bigger_messages_come_in_fewer_numbers_and_50_recipients_go_to_smtp_source() -> None:
    assert size_plan(2000) == [
        ("1 KiB", 1024, 1, 2000),
        ("100 KiB", 102400, 1, 400),
        ("1 MiB", 1048576, 1, 100),
        ("4 KiB x 50 rcpt", 4096, 50, 1000),
    ]
    assert [n for *_, n in size_plan(100)] == [100, 20, 20, 50]  # never below 20
    cases = size_cases(parse_args(["--messages", "2000"]))
    assert {c.load.kind for c in cases} == {"smtp-source -d"}
    assert [c.load.recipients for c in cases] == [1, 1, 1, 50]
    assert [c.probe_interval for c in cases] == [0.05, 0.05, 0.5, 0.05]  # a 1 MiB probe is load
    assert set(describe(parse_args([]))) >= {c.label for c in cases}


def test_every_other_run_goes_in_reverse_order() -> None:
    assert in_order([1, 2, 3], 1) == [1, 2, 3]
    assert in_order([1, 2, 3], 2) == [3, 2, 1]
    assert in_order([1, 2, 3], 3) == [1, 2, 3]


def _result(load: str, system: str, e2e: float, run: int) -> Result:
    return Result(load, system, 1000, 1000, 1000, 1.0, 1000 / e2e, [0.01], 2.0, 50.0, 4, run=run)


def test_relabelled_results_get_ratios_per_case_and_the_median_of_each_runs_ratio() -> None:
    rs: list[Result] = []
    # two cases share the harness's load kind; their labels keep their ratios apart
    for run, (pf, mq) in enumerate([(500, 400), (300, 450), (600, 600)], start=1):
        for label, k in (("size 1 KiB", 1), ("size 1 MiB", 10)):
            rs += relabel(_result("smtp-source -d", "postfix", pf / k, run), label)
            rs += relabel(_result("smtp-source -d", "mtaq", mq / k, run), label)
    assert relabel(None, "x") == []
    m = {(e["load"], e["system"]): e for e in medians(rows(rs))}
    # ratios 0.8, 1.5, 1.0: their median 1.0 (the ratio of the medians would be 450/500 = 0.9)
    assert m[("size 1 KiB", "mtaq")]["x_e2e_msgs_s"] == 1.0
    assert m[("size 1 MiB", "mtaq")]["x_e2e_msgs_s"] == 1.0
    assert m[("size 1 KiB", "mtaq")]["e2e_msgs_s"] == 450
    assert m[("size 1 MiB", "mtaq")]["runs"] == 3


def test_memory_per_message_and_beyond_the_body() -> None:
    m = memory_per_message(
        before=1_000_000, after=1_000_000 + 20_000 * 5_400, messages=20_000, body_octets=4096, fill_s=2.0
    )
    assert m.per_message == 5400
    assert m.beyond_body == 5400 - 4096
    f = m.figures()
    assert (f["bytes_per_message"], f["bytes_beyond_body"], f["fill_msgs_s"]) == (5400, 1304, 10000)
    assert "5400 B per queued message, 1304 B beyond the body" in m.line()
    assert "20000" in memory_table([(1, m)]) and memory_table([]) == ""
    assert memory_per_message(0, 0, 0, 10, 0.0).figures()["fill_msgs_s"] is None


def test_backlog_body_has_the_asked_size_and_the_zone_routes_both_destinations() -> None:
    for size in (1024, 4096, 10):
        body = backlog_body(size)
        assert body.endswith(b"\r\n") and b"\r\n\r\n" in body
        assert len(body) == max(size, len(backlog_body(0)))
    z = zone("127.0.0.2")
    assert z["mx.sink.test."] == [("A", "127.0.0.2")]
    assert z["down.test."] == [("MX", "10 mx.down.test.")] and z["mx.down.test."] == [("A", "127.0.0.3")]
