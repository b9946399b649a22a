"""What a load costs Redis (issue 15): INFO commandstats and used_cpu before and after, and with
``monitor`` every command (MONITOR) sorted into the phases of a message's life.

``RedisCost`` is the ``around`` of bench/harness.py ``measure``: entered once the system is up,
left when the sink has everything. A MONITOR feed costs Redis CPU of its own, so the phases come
from a run of their own (bench/ceiling.py ``--phases``), never from the run whose CPU is reported.

Phases are told apart by the command and its first key (every key name: common/store.py, RQ's
``rq:`` keys); a command run by a Lua script (MONITOR's ``[0 lua]``) goes to the phase of the
script that ran it, and counts as a command in commandstats but not as a client command.
``classify`` and ``Tally`` are pure (tests/unit/test_bench_ceiling.py)."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["NEXT", "PHASES", "SAME", "Cost", "RedisCost", "Tally", "classify", "parse_monitor_line"]

# In the order of a message's life; "other" is what no rule names (it should stay near 0).
PHASES = (
    "ingress commit",
    "ingress flow control",
    "RQ enqueue",
    "RQ dequeue+start",
    "RQ finish",
    "worker load+lease",
    "outcome write",
    "queue counters",
    "events",
    "suppression",
    "finish+delete",
    "destination limits",
    "heartbeat+maintenance",
    "other",
)
NEXT = "next"  # MULTI, EXEC, WATCH: the phase of the transaction they open or run (the next command's)
SAME = "same"  # EXPIRE and the like: the phase of the command before (a pipeline is fed in one piece)
_MAINTENANCE_KEYS = (
    "mtaq:sweep-lock",
    "mtaq:recovery-lock",
    "mtaq:samples",
    "mtaq:events:sender",
    "rq:scheduler",
    "rq:scheduled:",
    "rq:workers",
    "rq:queues",
    "rq:clean",
    "rq:failed:",
    "rq:finished:",
    "rq:deferred:",
    "rq:canceled:",
)


def classify(cmd: str, args: Sequence[str], script: str = "") -> str:
    """The phase of one command (upper-case name, its arguments), or NEXT / SAME (see there);
    ``script`` is the phase of the Lua script running it, "" for a client's own command."""
    key = args[0] if args else ""
    if script:
        if cmd == "XADD":
            return "events"
        if key.startswith("mtaq:suppressed"):
            return "suppression"
        if key.startswith(("mtaq:queue:", "mtaq:hold")):
            return "queue counters"
        if key.startswith("rq:") and script in ("RQ enqueue", "RQ dequeue+start"):
            return _rq_phase(cmd, args)  # a drain job's writes (common/jobqueue.py): RQ's own
        return script
    if cmd in ("MULTI", "EXEC", "WATCH", "UNWATCH"):
        return NEXT
    if cmd in ("EXPIRE", "PEXPIRE", "PERSIST", "EXPIREAT", "PEXPIREAT"):
        return "heartbeat+maintenance" if key.startswith("mtaq:holder:") else SAME  # a job's leases pushed on
    if cmd in ("EVAL", "EVALSHA"):
        return _script_phase(cmd, args)
    if cmd in ("HELLO", "PING", "SCRIPT", "INFO", "CLIENT", "SELECT", "MONITOR"):
        return "heartbeat+maintenance"
    if key.startswith(_MAINTENANCE_KEYS) and not key.startswith("rq:scheduled:"):
        return "heartbeat+maintenance"
    if cmd == "XADD" or key.startswith("mtaq:events"):
        return "events"
    for prefix, phase in _MTAQ_PREFIXES:
        if key.startswith(prefix):
            return phase
    if key.startswith(("mtaq:msg:", "mtaq:rcpt:", "mtaq:left:", "mtaq:index", "mtaq:stats", "mtaq:committed:")):
        if cmd in ("HSET", "SET", "ZADD", "HINCRBY"):
            return "ingress commit"
        return "ingress flow control" if cmd == "ZCARD" else "worker load+lease"
    if key.startswith("mtaq:hold"):
        return "worker load+lease"
    if key.startswith("rq:"):
        return _rq_phase(cmd, args)
    return "other"


_MTAQ_PREFIXES = (
    ("mtaq:suppressed", "suppression"),
    ("mtaq:queue:", "queue counters"),
    ("mtaq:dest:", "destination limits"),
    ("mtaq:mta-sts:", "destination limits"),
    ("mtaq:tlsrpt", "destination limits"),
    ("mtaq:lease:", "worker load+lease"),  # an older mtaq's, a key a message
    ("mtaq:leases:", "worker load+lease"),
    ("mtaq:holder:", "heartbeat+maintenance"),  # a job's leases pushed on (PEXPIRE)
    ("mtaq:drawn:", "RQ finish"),  # a drain job's list of what it took, dropped at its end
    ("mtaq:pend-count", "ingress flow control"),
    ("mtaq:drawn-avg", "ingress flow control"),
    ("mtaq:armed", "heartbeat+maintenance"),  # the clean-up's look for lost drain jobs
)


def _script_phase(cmd: str, args: Sequence[str]) -> str:
    """EVAL's script text, or EVALSHA's keys, name the script."""
    body = args[0] if cmd == "EVAL" and args else ""
    try:
        nkeys = int(args[1])
    except (IndexError, ValueError):
        return "other"
    keys, argv = list(args[2 : 2 + nkeys]), list(args[2 + nkeys :])
    first = keys[0] if keys else ""
    if "ARGV[1] .. d" in body:
        return "ingress commit"  # queuestats.COMMIT
    if first == "mtaq:index":
        return "finish+delete"  # queuestats.DELETE
    if first == "mtaq:armed":
        return "RQ enqueue"  # common/jobqueue.py _ARM: a commit's ids, a drain job if none is queued
    if first.startswith("mtaq:pend:"):
        return "RQ dequeue+start"  # common/jobqueue.py _DRAW: a drain job takes its share
    if first == "mtaq:stats":
        return "outcome write"  # common/statusscript.py SET_STATUSES (the keys every entry shares first)
    if first.startswith("mtaq:leases:"):
        return "worker load+lease"  # common/leasebook.py: a job's leases taken or ended, the sweep's prune
    if first.startswith("mtaq:lease:"):
        # store._RENEW_LEASE (token, ms: the heartbeat's) or _END_LEASE (token)
        return "heartbeat+maintenance" if len(argv) > 1 else "worker load+lease"
    if first.startswith("mtaq:dest:"):
        return "destination limits"
    if first.startswith("mtaq:msg:"):
        return "finish+delete"  # the delay warning's claim, the sweep's repair
    if first.startswith(("mtaq:hold", "rq:")):
        return "heartbeat+maintenance"
    return "other"


def _fields(args: Sequence[str]) -> list[str]:
    return list(args[1::2])


def _rq_phase(cmd: str, args: Sequence[str]) -> str:
    key = args[0] if args else ""
    xx = "XX" in (a.upper() for a in args[1:3])
    if key.startswith(_MAINTENANCE_KEYS) and not key.startswith("rq:worker:"):
        return "RQ enqueue" if key.startswith("rq:scheduled:") and cmd == "ZADD" else "heartbeat+maintenance"
    if key == "rq:suspended":
        return "RQ dequeue+start"
    if key.startswith("rq:queue:"):
        if cmd in ("RPUSH", "LPUSH"):
            return "RQ enqueue"
        return "ingress flow control" if cmd == "LLEN" else "RQ dequeue+start"
    if key.startswith("rq:wip:"):
        if cmd == "ZADD":
            return "heartbeat+maintenance" if xx else "RQ dequeue+start"
        return {"ZREM": "RQ finish", "ZCARD": "ingress flow control"}.get(cmd, "heartbeat+maintenance")
    if key.startswith("rq:worker:"):
        if key.endswith(":executions"):
            return {"SADD": "RQ dequeue+start", "SREM": "RQ finish"}.get(cmd, "heartbeat+maintenance")
        if cmd == "HSET" and "state" in _fields(args):
            return "RQ finish" if "idle" in args else "RQ dequeue+start"
        if cmd in ("HINCRBY", "HINCRBYFLOAT"):
            return "RQ finish"
        return "heartbeat+maintenance"
    if cmd == "HSET":
        fields = _fields(args)
        if "data" in fields:
            return "RQ enqueue"  # job.save(): the whole job
        if fields == ["last_heartbeat"]:
            return "heartbeat+maintenance"
        return "RQ dequeue+start" if "status" in fields or key.startswith("rq:execution:") else "RQ finish"
    if cmd == "ZADD":
        return "heartbeat+maintenance" if xx else "RQ dequeue+start"
    if cmd in ("HGETALL", "BLMOVE", "LMOVE") and key.startswith("rq:job:"):
        return "RQ dequeue+start"
    return "RQ finish"


_LINE = re.compile(r"^(?P<t>[\d.]+) \[\d+ (?P<who>[^\]]+)\] (?P<rest>.*)$")
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_monitor_line(line: str) -> tuple[bool, str, list[str]] | None:
    """(run by Lua, COMMAND, arguments) of a MONITOR line; None for anything else ("OK")."""
    m = _LINE.match(line.strip())
    if m is None:
        return None
    words = _ARG.findall(m["rest"])
    if not words:
        return None
    return m["who"] == "lua", words[0].upper(), words[1:]


@dataclass
class Tally:
    """Commands per phase from a MONITOR feed: client commands (each one the client sent, whether
    alone or in a pipeline or a MULTI) and Lua's (run by a script)."""

    client: Counter[str] = field(default_factory=Counter)
    lua: Counter[str] = field(default_factory=Counter)
    by_command: Counter[str] = field(default_factory=Counter)
    _script: str = ""  # the phase of the script whose commands follow (MONITOR feeds them after it)
    _last: str = "other"
    _waiting: list[str] = field(default_factory=list)

    def add(self, lua: bool, cmd: str, args: Sequence[str]) -> None:
        self.by_command[cmd] += 1
        if lua:
            self.lua[classify(cmd, args, self._script or "other")] += 1
            return
        phase = classify(cmd, args)
        if phase == NEXT:
            self._waiting.append(cmd)
            return
        if phase == SAME:
            phase = self._last
        self._script = phase if cmd in ("EVAL", "EVALSHA") else ""
        self._last = phase
        self.client[phase] += 1 + len(self._waiting)
        self._waiting.clear()

    def add_line(self, line: str) -> None:
        got = parse_monitor_line(line)
        if got is not None:
            self.add(*got)

    def rows(self, messages: int) -> list[tuple[str, float, float]]:
        """(phase, client commands per message, Lua commands per message), in PHASES order."""
        n = max(1, messages)
        return [(p, self.client[p] / n, self.lua[p] / n) for p in PHASES if self.client[p] or self.lua[p]]


@dataclass
class Cost:
    """Redis over one load: commands (commandstats, Lua's included), CPU seconds (used_cpu_sys +
    used_cpu_user of the server), and with MONITOR the phases."""

    commands: Counter[str]
    cpu_s: float
    tally: Tally | None = None
    sys_s: float = 0.0  # of cpu_s, in the kernel: socket reads and writes, the AOF's write and fsync
    reads: int = 0  # client reads the server processed (INFO total_reads_processed): round trips
    seconds: float = 0.0  # how long the load took, entry to exit
    # Redis with the system up and no mail (RedisCost ``idle``): its own timers (serverCron at hz 10)
    # and the system's heartbeats and polls, per second. What of the load's figures is that: it
    # does not grow with the messages, so it is a smaller share of each at a higher rate.
    idle_cpu_s_per_s: float | None = None
    idle_commands_per_s: float | None = None

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    def per_message(self, delivered: int) -> dict[str, float]:
        n = max(1, delivered)
        cpu_ms = self.cpu_s * 1000 / n
        out = {"commands_per_msg": round(self.total / n, 1), "cpu_ms_per_msg": round(cpu_ms, 3)}
        out["one_core_msgs_s"] = round(1000 / cpu_ms) if cpu_ms > 0 else 0
        if self.reads:
            out["round_trips_per_msg"] = round(self.reads / n, 1)
            out["sys_share"] = round(self.sys_s / self.cpu_s, 2) if self.cpu_s > 0 else 0.0
        if self.tally is not None:
            out["client_commands_per_msg"] = round(sum(self.tally.client.values()) / n, 1)
        if self.idle_cpu_s_per_s is not None and self.idle_commands_per_s is not None and self.seconds > 0:
            idle_ms = self.idle_cpu_s_per_s * self.seconds * 1000 / n
            out["idle_cpu_ms_per_msg"] = round(idle_ms, 3)
            out["idle_commands_per_msg"] = round(self.idle_commands_per_s * self.seconds / n, 1)
            out["idle_cpu_ms_per_s"] = round(self.idle_cpu_s_per_s * 1000, 2)
            marginal = cpu_ms - idle_ms
            out["marginal_cpu_ms_per_msg"] = round(marginal, 3)
            out["marginal_one_core_msgs_s"] = round(1000 / marginal) if marginal > 0 else 0
        return out


def diff_commandstats(before: Mapping[str, Any], after: Mapping[str, Any]) -> Counter[str]:
    """Calls per command between two INFO commandstats answers (the INFO of ``after`` left out:
    it is our own)."""
    out: Counter[str] = Counter()
    for k, v in after.items():
        name = k.removeprefix("cmdstat_")
        n = int(v["calls"]) - int(before.get(k, {"calls": 0})["calls"])
        if n > 0:
            out[name] = n
    out["info"] -= 1
    return +out


IDLE_SETTLE = 2.0  # seconds the system runs before its idle cost is measured


class RedisCost:
    """``around`` for bench/harness.py: the system's Redis (its unix socket) measured from entry to
    exit; ``monitor`` also feeds every command to a Tally (costs Redis CPU: a run of its own)."""

    def __init__(self, sock: Path, *, monitor: bool = False, dump: Path | None = None, idle: float = 0.0) -> None:
        self.sock = sock
        self.monitor = monitor
        self.dump = dump  # the raw MONITOR lines too (to read what a rule left in "other")
        self.idle = idle  # seconds of the system up without mail measured first (Cost.idle_*)
        self.cost: Cost | None = None

    @contextlib.contextmanager
    def __call__(self, system: object) -> Iterator[None]:
        import redis

        r = redis.Redis(unix_socket_path=str(self.sock), socket_timeout=10, decode_responses=True)
        tally = Tally() if self.monitor else None
        stop = threading.Event()
        feed = threading.Thread(target=self._feed, args=(tally, stop), daemon=True) if tally else None
        try:
            if feed:
                feed.start()
            idle_cpu = idle_commands = None
            if self.idle > 0:
                time.sleep(IDLE_SETTLE)  # the system's start-up (scripts loaded, first clean-ups) over
                quiet0, qcpu0, t = r.info("commandstats"), r.info("cpu"), time.monotonic()
                time.sleep(self.idle)
                quiet1, qcpu1, took = r.info("commandstats"), r.info("cpu"), time.monotonic() - t
                idle_cpu = (_cpu(qcpu1) - _cpu(qcpu0)) / took
                # diff_commandstats leaves out one INFO of ours; the INFO cpu between is the other
                idle_commands = (sum(diff_commandstats(quiet0, quiet1).values()) - 1) / took
            before, cpu0, reads0 = r.info("commandstats"), r.info("cpu"), _reads(r)
            t0 = time.monotonic()
            yield
            seconds = time.monotonic() - t0
            after, cpu1, reads1 = r.info("commandstats"), r.info("cpu"), _reads(r)
            sys_s = float(cpu1["used_cpu_sys"]) - float(cpu0["used_cpu_sys"])
            self.cost = Cost(
                diff_commandstats(before, after),
                _cpu(cpu1) - _cpu(cpu0),
                tally,
                sys_s,
                max(0, reads1 - reads0 - 3),
                seconds,
                idle_cpu,
                None if idle_commands is None else max(0.0, idle_commands),
            )
        finally:
            stop.set()
            if feed:
                feed.join(10)
            r.close()

    def _feed(self, tally: Tally | None, stop: threading.Event) -> None:
        """MONITOR on a raw socket (redis-py's Monitor drops the ``[0 lua]`` marker we need)."""
        import socket

        assert tally is not None
        dump = self.dump.open("a") if self.dump else contextlib.nullcontext()
        with socket.socket(socket.AF_UNIX) as s, dump as out:
            s.connect(str(self.sock))
            s.sendall(b"MONITOR\r\n")
            s.settimeout(0.5)
            buf = b""
            while not stop.is_set():
                try:
                    chunk = s.recv(1 << 16)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\r\n")
                for line in lines:
                    if line.startswith(b"+"):
                        text = line[1:].decode(errors="replace")
                        tally.add_line(text)
                        if out is not None:
                            out.write(text + "\n")


def _reads(r: Any) -> int:
    return int(r.info("stats").get("total_reads_processed", 0))


def _cpu(info: Mapping[str, Any]) -> float:
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
