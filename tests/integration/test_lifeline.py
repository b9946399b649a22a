"""Children die with their supervisor (issue: a `kill -9` of `mtaq run` orphaned everything), a new
run starts over a dead run's leftovers, and a port or data_dir already taken is one line at once."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from mtaq.runtime.embedded import EmbeddedRedis, find_redis_server
from mtaq.runtime.supervise import EXIT_FATAL
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, ROOT, message, route
from tests.integration.eventually import GENEROUS, eventually
from tests.mtaqrun import queue_listing, start_run, stop
from tests.ports import free_port, wait_port
from tests.procs import alive, children, descendants, listeners, refused
from tests.redisserver import RedisServer
from tests.sinks import wait_for

# What "within seconds" means here: the kernel's parent-death signal acts at once, the portable
# watch within a second; this bounds a graceful stop of idle processes on a loaded machine.
GONE_WITHIN = 20.0


def mtaq(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtaq", *args],
        cwd=ROOT,
        env={**os.environ, "MTAQ_HOSTNAME": "mtaq.test", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_kill_9_of_run_takes_every_child_with_it_and_a_new_run_starts(
    tmp_path: Path, dns: ZoneServer, mx_port: int
) -> None:
    data_dir, log, port = tmp_path / "var", tmp_path / "run.log", free_port()
    route(dns, "deferred.test", "127.0.0.9")  # nobody listens there: the worker defers, the mail stays
    p = start_run(data_dir, port, dns, mx_port, log, workers=1)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=GENEROUS) as s:
            s.sendmail("alice@client.test", ["bob@deferred.test"], message("kept"))
        redis_pid = int((data_dir / "redis.pid").read_text())
        # redis, ingress, worker, scheduler
        assert wait_for(lambda: len(descendants(p.pid)) >= 4, GENEROUS), log.read_text()
        below = descendants(p.pid)
        assert redis_pid in below
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert wait_for(lambda: not any(alive(c) for c in below), GONE_WITHIN), (below, log.read_text())
        assert refused(port)  # nobody takes mail for a run that is gone
    finally:
        if p.poll() is None:
            stop(p, log)
    text = log.read_text()
    # the second run: no traceback about "a Redis already serves", and the message is still queued
    p = start_run(data_dir, port, dns, mx_port, log, workers=0)
    try:
        listing = queue_listing(data_dir)
        assert "bob@deferred.test" in listing and "1 Request." in listing, listing
    finally:
        stop(p, log)
    assert "a Redis already serves" not in log.read_text()
    assert "supervisor" in text or "SIGTERM" in text


def test_ingress_processes_die_with_their_supervisor(redis_server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    with open(tmp_path / "ingress.log", "ab") as out:
        p = subprocess.Popen(
            [sys.executable, "-m", "mtaq", "ingress", "--processes", "2", "--listen", f"127.0.0.1:{port}"],
            cwd=ROOT,
            env={**os.environ, "MTAQ_REDIS_URL": redis_server.url, "MTAQ_HOSTNAME": "mtaq.test"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_port("127.0.0.1", port)
        assert wait_for(lambda: len(descendants(p.pid)) == 2, GENEROUS)
        below = descendants(p.pid)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert wait_for(lambda: not any(alive(c) for c in below), GONE_WITHIN), (tmp_path / "ingress.log").read_text()
        assert refused(port), (below, listeners(port), (tmp_path / "ingress.log").read_text())
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_the_portable_watch_stops_an_orphan_without_the_kernels_help(tmp_path: Path) -> None:
    """The fallback alone (no PR_SET_PDEATHSIG): a middle process forks a child that watches it."""
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(
        f"""
        import os, time
        from mtaq.runtime.lifeline import watch_parent
        middle = os.getpid()
        if os.fork() == 0:
            watch_parent(middle, interval=0.1)
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(60)
            os._exit(3)
        time.sleep(60)
        """
    )
    middle = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text().isdigit(), GENEROUS)
        child = int(pid_file.read_text())
        middle.kill()
        middle.wait()
        assert wait_for(lambda: not alive(child), GENEROUS)
    finally:
        if middle.poll() is None:
            middle.kill()
            middle.wait()


def test_a_new_run_shuts_down_a_stale_redis_of_its_data_dir_and_keeps_its_data(
    tmp_path: Path, dns: ZoneServer, mx_port: int
) -> None:
    data_dir, log, port = tmp_path / "var", tmp_path / "run.log", free_port()
    # a redis-server a dead run left behind (started by hand: nothing ties it to a parent)
    stale = EmbeddedRedis(str(data_dir))
    data_dir.mkdir()
    (data_dir / "redis.conf").write_text(stale.config())
    old = subprocess.Popen([find_redis_server(), str(data_dir / "redis.conf")], stdin=subprocess.DEVNULL)
    try:
        client = redis.Redis(unix_socket_path=stale.socket)
        assert wait_for(lambda: os.path.exists(stale.socket), GENEROUS)
        assert wait_for(lambda: _pings(client), GENEROUS)
        client.hset("mtaq:stats", "received", 7)  # acknowledged by the stale server: must survive
        client.close()
        p = start_run(data_dir, port, dns, mx_port, log, workers=0)
        try:
            assert old.wait(30) == 0  # shut down in order (SHUTDOWN), not killed
            fresh = redis.Redis(unix_socket_path=stale.socket)
            assert fresh.hget("mtaq:stats", "received") == b"7"
            fresh.close()
        finally:
            stop(p, log)
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
    text = log.read_text()
    assert "left by a dead `mtaq run`" in text and "Traceback" not in text, text


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_a_second_run_on_the_same_data_dir_says_so_in_one_line(tmp_path: Path, dns: ZoneServer, mx_port: int) -> None:
    data_dir, log, port = tmp_path / "var", tmp_path / "run.log", free_port()
    p = start_run(data_dir, port, dns, mx_port, log, workers=0)
    try:
        second = mtaq("run", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{free_port()}", "--workers", "0")
        assert second.returncode == 1, second
        assert second.stderr.splitlines() == [
            f"mtaq: another `mtaq run` (pid {p.pid}) uses {data_dir.absolute()}: stop it, or give another --data-dir"
        ], second.stderr
        assert not refused(port)  # the first run is untouched
    finally:
        stop(p, log)


def test_run_on_a_port_in_use_says_so_in_one_line_and_exits(tmp_path: Path, taken_port: int) -> None:
    r = mtaq("run", "--data-dir", str(tmp_path / "var"), "--listen", f"127.0.0.1:{taken_port}")
    assert r.returncode == EXIT_FATAL, r
    assert r.stderr.splitlines() == [
        f"mtaq: 127.0.0.1:{taken_port} is in use: stop what listens there, or give another --listen"
    ]
    assert not (tmp_path / "var" / "redis.sock").exists()  # nothing was started


def test_ingress_on_a_port_in_use_says_so_in_one_line_and_exits(redis_server: RedisServer, taken_port: int) -> None:
    for processes in ("1", "2"):
        r = mtaq(
            "ingress", "--processes", processes, "--listen", f"127.0.0.1:{taken_port}", "--redis-url", redis_server.url
        )
        assert r.returncode == EXIT_FATAL, r
        assert f"127.0.0.1:{taken_port} is in use" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len([ln for ln in r.stderr.splitlines() if "in use" in ln]) == 1


def test_the_scheduler_a_worker_forked_stops_when_the_worker_is_killed(
    mta_factory: Callable[..., MTA],
) -> None:
    """RQ's scheduler is a process the worker holding its lock forks: a worker SIGKILLed (the OOM
    killer) left it running on, with the lock, watched by nobody."""
    mta = mta_factory()
    mta.start_worker()  # alone: it takes the scheduler lock
    worker = mta.procs["worker0"]
    eventually(lambda: children(worker.pid) != [] and "Scheduler for" in mta.logs(), "the scheduler process")
    [scheduler] = children(worker.pid)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    mta.procs.pop("worker0")
    eventually(lambda: not alive(scheduler), f"the scheduler (pid {scheduler}) gone with its worker")
