"""bench/ceiling.py end to end at a tiny size: a real `mtaq run` with one worker, ten loopback
smtp-sinks, the loopback DNS server, INFO before and after, and a MONITOR feed sorted into phases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import ceiling
from tests.tools import require


@pytest.fixture(autouse=True)
def smtp_sink() -> str:
    """Postfix's smtp-sink: skipped without it, failed without it in CI (tests/tools.py)."""
    return require("smtp-sink")


def test_a_tiny_ceiling_run_measures_redis_per_message_and_its_phases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--workers", "1", "--messages", "10", "--wait", "0", "--phases", "--timeout", "60", "--idle", "1"]
    assert ceiling.main([*argv, "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "one Redis core, msgs/s" in out and "where the commands go" in out
    (written,) = tmp_path.glob("*-ceiling.json")
    doc = json.loads(written.read_text())
    (row,) = doc["ceiling"]
    assert row["workers"] == 1 and row["delivered"] == 10
    # every message crossed Redis several times: committed, loaded, its outcome written
    assert 10 < row["commands_per_msg"] < 200 and row["cpu_ms_per_msg"] > 0 and row["round_trips_per_msg"] > 2
    # a second of the system up without mail first: Redis's timers and the system's heartbeats
    # (what is left may be near nothing on 10 messages: the idle rate times a load of seconds)
    assert row["idle_cpu_ms_per_s"] > 0 and row["marginal_cpu_ms_per_msg"] < row["cpu_ms_per_msg"]
    phases = doc["phases"]
    assert phases["ingress commit"]["client"] >= 1  # HSET msg (one key a message); ZADD index a commit
    # one script call a writer's turn, whatever it carries
    assert phases["outcome write"]["client"] > 0 and phases["outcome write"]["lua"] >= 3
    assert phases.get("other", {"client": 0.0})["client"] < 1, "commands no rule names"
