"""The supervisor's rules about children: a fatal exit is not restarted; stopping is terminate,
wait, kill."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from mtaq.runtime.supervise import EXIT_FATAL, Child, Supervisor, stop_processes
from tests.integration.eventually import GENEROUS


def _cannot_start() -> None:
    sys.exit(EXIT_FATAL)


def _idle() -> None:
    time.sleep(60)


def test_a_child_that_cannot_start_is_not_restarted_and_stops_the_rest() -> None:
    fatal = Child("ingress", target=_cannot_start)
    other = Child("worker", target=_idle)
    t0 = time.monotonic()
    # stop_timeout far beyond the bound below: ending within GENEROUS means the fatal exit stopped
    # the rest at once, and the polite child needed no kill after the stop timeout
    assert Supervisor([fatal, other], stop_timeout=2 * GENEROUS).run() == EXIT_FATAL
    assert time.monotonic() - t0 < GENEROUS
    assert fatal.restarts == 0
    assert other.exitcode() == -signal.SIGTERM


def test_stop_processes_kills_what_ignores_sigterm() -> None:
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    killed = stop_processes([stubborn, polite], timeout=0.5)
    assert killed == [stubborn]
    assert stubborn.returncode == -signal.SIGKILL and polite.returncode == -signal.SIGTERM
