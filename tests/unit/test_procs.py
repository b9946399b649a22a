"""The tests' view of processes: a process whose main thread is a zombie while another thread still
runs is alive (its file table, and so its listening sockets, are still open)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.procs import alive
from tests.sinks import wait_for

SCRIPT = textwrap.dedent(
    """
    import ctypes, sys, threading
    threading.Thread(target=sys.stdin.read).start()   # runs until the test closes stdin
    print("ready", flush=True)
    ctypes.CDLL(None).pthread_exit(None)              # the main thread ends, the process does not
    """
)


def main_thread_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_process_with_a_zombie_main_thread_and_a_running_thread_is_alive() -> None:
    p = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        assert wait_for(lambda: main_thread_state(p.pid) == "Z", 10)
        assert alive(p.pid)
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(10)
    assert not alive(p.pid)  # reaped: gone
