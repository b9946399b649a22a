"""What a system costs while it runs, read from /proc: CPU time of all its processes and their
summed PSS. Pure parsers first (tested in tests/unit/test_bench.py), the sampler after them.

A *system* is the process tree under a root pid (``mtaq run`` with its ingress, workers and
embedded redis-server; Postfix's master with every daemon it forked; the aiosmtpd sink).

CPU: for every live process of the tree, utime + stime + cutime + cstime. The c-fields hold the
CPU of children the process has already waited for (Postfix's smtpd/smtp/cleanup come and go; RQ
may fork a work horse per job), so the sum over the live tree at any moment is everything the
tree has burnt since it started, dead children included. The difference of two such sums is the
CPU of the interval, whatever died in between.

Memory: PSS (proportional set size) shares each shared page between the processes mapping it,
so summing it over the tree counts a page once: unlike RSS, which would count Postfix's shared
libraries once per smtpd. The peak is the largest sum seen by the sampler (every 0.2 s).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Sampler",
    "by_role",
    "cpu_seconds",
    "parse_pss_kib",
    "parse_stat",
    "parse_times",
    "percentile",
    "role_of",
    "tree",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) by linear interpolation between closest ranks (numpy's
    default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass(frozen=True)
class Stat:
    pid: int
    ppid: int
    ticks: int  # utime + stime + cutime + cstime, in clock ticks


def _fields(text: str) -> list[str]:
    """/proc/PID/stat's fields from the third on. The command name (field 2) sits in parentheses
    and may itself hold spaces and parentheses, so fields are counted from the last ')'."""
    return text[text.rindex(")") + 2 :].split()


def parse_times(text: str) -> tuple[int, int]:
    """(user, system) clock ticks of /proc/PID/stat's process, with those of the children it has
    reaped (utime + cutime, stime + cstime: fields 14 and 16, 15 and 17)."""
    rest = _fields(text)
    return int(rest[11]) + int(rest[13]), int(rest[12]) + int(rest[14])


def parse_stat(text: str) -> Stat:
    """Parse /proc/PID/stat."""
    pid = int(text[: text.index("(")].strip())
    ppid = int(_fields(text)[1])  # field 4 (the list starts at field 3, the state)
    return Stat(pid, ppid, sum(parse_times(text)))


def parse_pss_kib(text: str) -> int:
    """The Pss line of /proc/PID/smaps_rollup (kB); 0 when absent (kernel thread, exited)."""
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, ValueError):  # exited between listdir and read, or a kernel thread
        return None


def _all_stats() -> dict[int, Stat]:
    out: dict[int, Stat] = {}
    for name in os.listdir(PROC):
        if name.isdigit():
            text = _read(PROC / name / "stat")
            if text:
                st = parse_stat(text)
                out[st.pid] = st
    return out


def tree(roots: Iterable[int], stats: dict[int, Stat] | None = None) -> dict[int, Stat]:
    """The live processes under ``roots`` (roots included), by parent pid."""
    stats = _all_stats() if stats is None else stats
    kids: dict[int, list[int]] = {}
    for st in stats.values():
        kids.setdefault(st.ppid, []).append(st.pid)
    out: dict[int, Stat] = {}
    todo = [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out[pid] = stats[pid]
            todo += kids.get(pid, [])
    return out


MTAQ_ROLES = ("ingress", "worker", "run")


def role_of(cmdline: Sequence[str], comm: str) -> str:
    """What a process of a system is, for its CPU by process: an mtaq process's role (``mtaq
    ingress``, ``mtaq worker``, ``mtaq run``: the word after ``mtaq``), anything else its command
    name (redis-server, Postfix's master, smtpd, cleanup, qmgr, smtp...)."""
    if any(arg.endswith("mtaq") for arg in cmdline):
        for word in cmdline:
            if word in MTAQ_ROLES:
                return f"mtaq {word}"
    return comm


def _role(pid: int) -> str:
    stat = _read(PROC / str(pid) / "stat") or "(?)"
    cmdline = (_read(PROC / str(pid) / "cmdline") or "").split("\0")
    return role_of(cmdline, stat[stat.find("(") + 1 : stat.rfind(")")])


def by_role(
    start: dict[int, tuple[str, int]], end: dict[int, tuple[str, int]], parents: Mapping[int, int] | None = None
) -> dict[str, float]:
    """CPU seconds between two looks at a tree (pid -> (role, ticks)), summed by role: a process
    alive at the end counts from its start (or from 0 if it started between); one that died is in
    its parent's c-fields, so in its parent's role. ``parents`` (pid -> parent pid at the start)
    lets that role give back what the dead one had spent before the start, which the first look
    counted already (its whole life is in the c-fields)."""
    out: dict[str, float] = {}
    for pid, (role, ticks) in end.items():
        before = start.get(pid)
        spent = ticks - (before[1] if before is not None and before[0] == role else 0)
        out[role] = out.get(role, 0.0) + spent / CLK_TCK
    for pid, (_, ticks) in start.items():
        if pid in end or parents is None:
            continue
        up = parents.get(pid)
        while up is not None and up not in end:
            up = parents.get(up)
        if up is not None:  # the ancestor that reaped it, alive at the end
            role = end[up][0]
            out[role] = out.get(role, 0.0) - ticks / CLK_TCK
    return out


def cpu_seconds(procs: dict[int, Stat]) -> float:
    return sum(st.ticks for st in procs.values()) / CLK_TCK


def pss_kib(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        text = _read(PROC / str(pid) / "smaps_rollup")
        total += parse_pss_kib(text) if text else 0
    return total


class Sampler:
    """Samples a system's tree every ``interval`` seconds in a thread: peak summed PSS, and the
    CPU total at the first and the last sample (``cpu`` is the difference)."""

    def __init__(self, roots: Sequence[int], interval: float = 0.2) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.peak_pss_kib = 0
        self.peak_procs = 0
        self.cpu_start = 0.0
        self.cpu_end = 0.0
        self._roles_start: dict[int, tuple[str, int]] = {}
        self._parents_start: dict[int, int] = {}
        self._roles_end: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def sample(self) -> float:
        return cpu_seconds(self._look())

    def _look(self) -> dict[int, Stat]:
        procs = tree(self.roots)
        pss = pss_kib(procs)
        if pss > self.peak_pss_kib:
            self.peak_pss_kib = pss
        self.peak_procs = max(self.peak_procs, len(procs))
        return procs

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    @staticmethod
    def _roles(procs: dict[int, Stat]) -> dict[int, tuple[str, int]]:
        # from the same look as the total: a second read of /proc could be a clock tick later
        return {pid: (_role(pid), st.ticks) for pid, st in procs.items()}

    def __enter__(self) -> Sampler:
        procs = self._look()
        self._roles_start, self.cpu_start = self._roles(procs), cpu_seconds(procs)
        self._parents_start = {pid: st.ppid for pid, st in procs.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        procs = self._look()
        self._roles_end, self.cpu_end = self._roles(procs), cpu_seconds(procs)

    @property
    def cpu(self) -> float:
        """CPU seconds the tree used between ``__enter__`` and ``__exit__``."""
        return self.cpu_end - self.cpu_start

    @property
    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds of the interval by process role (``role_of``), workers summed."""
        return by_role(self._roles_start, self._roles_end, self._parents_start)

    @property
    def peak_pss_mib(self) -> float:
        return self.peak_pss_kib / 1024
