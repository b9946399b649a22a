"""The remote end of every benchmark: Postfix's ``smtp-sink`` dumping each message to its own file.

``smtp-sink -d TEMPLATE`` writes one file per transaction; the file's mtime is the moment the sink
finished receiving it (the kernel's coarse clock, a few ms). That gives the *delivered* side of
arrival -> delivered latency without trusting the system under test. The *arrival* side is the
message's own ``X-Bench-Sent:`` header (ns since the epoch, written by the sender just before the
message's content: bench/loadgen.py and the probe in bench/loads.py).

``-w SECONDS`` makes the sink wait before answering DATA: a slow remote server (bench/slowdest.py).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.systems import stop_proc

__all__ = ["DumpSink", "Received", "Sink", "SinkGroup", "ensure_postfix_tools", "parse_sent_ns"]

_SENT = re.compile(rb"^X-Bench-Sent: (\d+)\r?$", re.MULTILINE)
HEAD_BYTES = 8192  # the header sits in the first lines: the sink's own X-* lines, Received:, ours


def parse_sent_ns(head: bytes) -> int | None:
    """The X-Bench-Sent timestamp (ns) in a message's first bytes, None when it has none."""
    m = _SENT.search(head)
    return int(m.group(1)) if m else None


def ensure_postfix_tools() -> str | None:
    """smtp-source and smtp-sink on PATH, installing Debian's postfix package when they are missing
    and we may (root with apt-get). Returns None when ready, else one line saying what to do."""
    if shutil.which("smtp-sink") and shutil.which("smtp-source"):
        return None
    hint = "smtp-source/smtp-sink not found: install Debian's postfix package (apt-get install postfix)"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return hint
    print("installing postfix (smtp-source, smtp-sink) with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postfix"]):
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            return f"{hint}; `{' '.join(argv)}` failed: {r.stderr.strip().splitlines()[-1:]}"
    return None if shutil.which("smtp-sink") else hint


@dataclass(frozen=True)
class Received:
    at: float  # epoch seconds the sink finished the message (file mtime)
    sent: float | None  # the message's X-Bench-Sent, epoch seconds

    @property
    def latency(self) -> float | None:
        return None if self.sent is None else self.at - self.sent


TMPFS = Path("/dev/shm")


def _dump_dir(asked: Path) -> Path:
    """Where the sink writes: a fresh directory on tmpfs when there is one, else ``asked``. The sink
    is the remote MX, not a system under test, yet one file per message on the root filesystem
    costs the machine the systems share more than either system's own delivery: on this 2-core
    VM's ext4, after many runs had created and deleted millions of files, perf gave smtp-sink 39 %
    of all CPU samples during an smtp-source -d run (the inode allocator: find_inode_bit,
    recently_deleted, find_get_block_common), more than redis-server and the workers together. A
    faster system pays it on more messages a second, so it also narrowed the ratios."""
    if TMPFS.is_dir() and os.access(TMPFS, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="mtaq-bench-sink-", dir=TMPFS)) / asked.name
    return asked


class DumpSink:
    """smtp-sink on host:port writing every message under ``directory``. ``-u nobody`` when root
    (smtp-sink refuses to run as root without it), so the directory is made world-writable."""

    def __init__(self, directory: Path, host: str, port: int, *, wait_data: float = 0, backlog: int = 1024) -> None:
        self.asked = directory.absolute()
        self.dir = self.asked  # where the messages go: on tmpfs from start() when there is one
        self.host, self.port = host, port
        self.wait_data = wait_data
        self.backlog = backlog
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            "smtp-sink",
            "-m",
            "2048",  # simultaneous sessions (its default of 256 would cap Postfix's 100 smtp + ours)
            *(["-u", "nobody"] if os.geteuid() == 0 else []),
            *(["-w", f"{self.wait_data:g}"] if self.wait_data else []),
            # %H%M%S/ keeps the random suffix unique per second; smtp-sink creates the directories
            "-d",
            f"{self.dir}/%H%M%S/",
            f"{self.host}:{self.port}",
            str(self.backlog),
        ]

    def start(self) -> None:
        self.dir = _dump_dir(self.asked)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o777)
        if os.geteuid() == 0:  # nobody must reach it: a mkdtemp() parent is 0700
            for parent in self.dir.parents:
                mode = parent.stat().st_mode
                if not mode & stat.S_IXOTH:
                    parent.chmod(mode | stat.S_IXOTH)
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        stop_proc(self.proc, 10)
        if self.dir != self.asked:
            shutil.rmtree(self.dir.parent, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> DumpSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def files(self) -> list[Path]:
        out: list[Path] = []
        try:
            subs = list(os.scandir(self.dir))
        except FileNotFoundError:
            return out
        for sub in subs:
            if sub.is_dir():
                out += [Path(e.path) for e in os.scandir(sub.path)]
        return out

    def count(self) -> int:
        """Messages the sink has started or finished (one file each); cheap enough to poll."""
        return len(self.files())

    def collect(self) -> list[Received]:
        """Every message so far, then forget them (the next system starts from an empty sink)."""
        out: list[Received] = []
        for f in self.files():
            try:
                st = f.stat()
                if st.st_size == 0:  # still in DATA (a timed-out run): not delivered
                    continue
                at = st.st_mtime
                with f.open("rb") as fh:
                    head = fh.read(HEAD_BYTES)
            except FileNotFoundError:
                continue
            ns = parse_sent_ns(head)
            out.append(Received(at, None if ns is None else ns / 1e9))
        for sub in os.scandir(self.dir):
            shutil.rmtree(sub.path, ignore_errors=True)
        return out


class SinkGroup:
    """Several DumpSinks counted as one (the slow-destination load's ten remote servers)."""

    def __init__(self, sinks: list[DumpSink]) -> None:
        self.sinks = sinks

    def __enter__(self) -> SinkGroup:
        for s in self.sinks:
            s.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.sinks:
            s.stop()

    def alive(self) -> bool:
        return all(s.alive() for s in self.sinks)

    def files(self) -> list[Path]:
        return [f for s in self.sinks for f in s.files()]

    def count(self) -> int:
        return sum(s.count() for s in self.sinks)

    def collect(self) -> list[Received]:
        return [r for s in self.sinks for r in s.collect()]


class Sink(Protocol):
    def alive(self) -> bool: ...
    def files(self) -> list[Path]: ...
    def count(self) -> int: ...
    def collect(self) -> list[Received]: ...
