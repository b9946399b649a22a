"""worker/journal.py: the outcome journal's lines, its file cut back to what waits, the adoption of
a dead process's journal (a live one's lock keeps it), and the outcome writer with a journal."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.envelope import RcptState, RecipientStatus
from common.events import parse_entries
from common.store import EVENTS, Store
from tests.unit.fakeclock import FakeClock
from tests.unit.test_outcomes import SENT, batch, store  # noqa: F401  (store: the fixture)
from worker import journal
from worker.feedback import Feedback
from worker.journal import ABANDON_AFTER, OutcomeJournal, adopt, decode, encode, journal_at
from worker.outcomes import OutcomeWriter

DONE = RecipientStatus(RcptState.DELIVERED, 1, "2.0.0", "250 2.0.0 Ok", "mx.test[192.0.2.1]:25", "mx.test")


def _dead_journal(directory: Path, *lines: bytes) -> Path:
    """A journal whose process is gone: the file, no lock on it."""
    path = directory / "host-99999-dead.journal"
    path.write_bytes(b"".join(lines))
    return path


def test_lines_read_back_and_a_line_cut_short_is_counted_not_raised() -> None:
    one = encode([("Q1", 0, DONE), ("Q1", 1, DONE)])
    two = encode([("Q2", 0, DONE)])
    entries, bad = decode(one + two + two[:10])
    assert [(q, i) for q, i, _ in entries] == [("Q1", 0), ("Q1", 1), ("Q2", 0)]
    assert entries[0][2] == DONE and bad == 1


def test_the_file_is_emptied_when_nothing_waits_and_a_clean_close_removes_it(tmp_path: Path) -> None:
    with OutcomeJournal(tmp_path) as j:
        a, b = encode([("Q1", 0, DONE)]), encode([("Q2", 0, DONE)])
        j.append(a)
        j.append(b)
        assert j.path.read_bytes() == a + b
        j.written([b])  # a is in Redis, b waits: the file stays as it is (a kill now leaves b in it)
        assert j.path.read_bytes() == a + b
        j.written([])
        assert j.path.read_bytes() == b""
        j.append(a)
        assert j.path.read_bytes() == a  # appended at the end the cut left
        path = j.path
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_a_big_file_is_written_again_with_what_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "REWRITE_AT", 100)
    with OutcomeJournal(tmp_path) as j:
        lines = [encode([(f"Q{n}", 0, DONE)]) for n in range(3)]
        for line in lines:
            j.append(line)
        j.written(lines[2:])
        assert j.path.read_bytes() == lines[2]


def test_a_journal_kept_at_close_is_adopted_and_one_made_by_a_parent_is_not_removed_by_its_child(
    tmp_path: Path,
) -> None:
    j = OutcomeJournal(tmp_path)
    j.append(encode([("Q1", 0, DONE)]))
    j.keep()
    j.close()
    assert j.path.exists() and adopt(tmp_path, None, lambda entries: 0) == 1
    j = OutcomeJournal(tmp_path)
    j._pid = -1  # as a forked child sees it
    j.close()
    assert j.path.exists()


@contextlib.contextmanager
def _locked_elsewhere(path: Path) -> Iterator[None]:
    """Another process holds ``path``'s lock for the block (a live worker, or one adopting it)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.kill()
        holder.wait()


_HOLD = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_a_live_processs_journal_is_left_and_a_dead_ones_adopted_and_removed(tmp_path: Path) -> None:
    got: list[list[tuple[str, int, RecipientStatus]]] = []
    live = tmp_path / "host-1-live.journal"
    live.write_bytes(encode([("L1", 0, DONE)]))
    dead = _dead_journal(tmp_path, encode([("Q1", 0, DONE)]), encode([("Q1", 1, DONE)]))

    def record(entries: list[tuple[str, int, RecipientStatus]]) -> int:
        got.append(entries)
        return len(entries)

    with _locked_elsewhere(live):
        assert adopt(tmp_path, None, record) == 2
    assert [[(q, i) for q, i, _ in e] for e in got] == [[("Q1", 0), ("Q1", 1)]]
    assert not dead.exists() and live.exists()


def test_the_adopter_holds_the_lock_while_it_records(tmp_path: Path) -> None:
    _dead_journal(tmp_path, encode([("Q1", 0, DONE)]))
    seen: list[str] = []

    def record(entries: object) -> int:
        probe = subprocess.run(
            [sys.executable, "-c", _PROBE, str(tmp_path / "host-99999-dead.journal")],
            capture_output=True,
            text=True,
            check=True,
        )
        seen.append(probe.stdout)
        return 1

    assert adopt(tmp_path, None, record) == 1 and seen == ["held\n"]


def test_a_file_that_cannot_be_read_does_not_stop_the_others(tmp_path: Path) -> None:
    (tmp_path / "a-directory.journal").mkdir()  # sorts first; os.open of it for writing fails
    dead = _dead_journal(tmp_path, encode([("Q1", 0, DONE)]))
    assert adopt(tmp_path, None, lambda entries: 0) == 1 and not dead.exists()


def test_a_process_leaves_its_own_journal_alone(tmp_path: Path) -> None:
    with OutcomeJournal(tmp_path) as j:
        j.append(encode([("Q1", 0, DONE)]))
        assert adopt(tmp_path, j.path, lambda entries: 0) == 0 and j.path.exists()


def test_the_lock_is_the_processs_not_its_childrens(tmp_path: Path) -> None:
    """RQ forks its scheduler from the worker: a child must not keep a dead worker's journal locked."""
    with OutcomeJournal(tmp_path) as j:
        pid = os.fork()
        if pid == 0:  # the child: as RQ's scheduler, it goes on living with the fd it inherited
            time.sleep(30)
            os._exit(0)
        try:
            probe = subprocess.run(
                [sys.executable, "-c", _PROBE, str(j.path)], capture_output=True, text=True, check=True
            )
            assert probe.stdout == "held\n"  # by us, the parent
            os.close(j._fd)  # the parent dies (its lock goes); the child lives on
            j._fd = -1
            probe = subprocess.run(
                [sys.executable, "-c", _PROBE, str(j.path)], capture_output=True, text=True, check=True
            )
            assert probe.stdout == "free\n"
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


_PROBE = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    print('held')\n"
    "else:\n    print('free')\n"
)


def test_a_journal_that_cannot_be_recorded_stays_for_the_next_look_until_it_is_given_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = _dead_journal(tmp_path, encode([("Q1", 0, DONE)]))

    def away(entries: object) -> int:
        raise ConnectionError("Redis away")

    assert adopt(tmp_path, None, away) == 0
    assert dead.exists() and "not recorded now (Redis away)" in caplog.text
    later = dead.stat().st_mtime + ABANDON_AFTER + 1
    assert adopt(tmp_path, None, away, now=lambda: later) == 1
    assert not dead.exists() and "given up" in caplog.text


def test_a_journal_is_not_given_up_while_redis_is_away(tmp_path: Path) -> None:
    dead = _dead_journal(tmp_path, encode([("Q1", 0, DONE)]))

    def away(entries: object) -> int:
        raise redis.ConnectionError("Connection refused")

    later = dead.stat().st_mtime + ABANDON_AFTER + 1
    assert adopt(tmp_path, None, away, now=lambda: later) == 0 and dead.exists()


def test_a_journal_another_adopter_holds_is_skipped(tmp_path: Path) -> None:
    dead = _dead_journal(tmp_path, encode([("Q1", 0, DONE)]))
    with _locked_elsewhere(dead):
        assert adopt(tmp_path, None, lambda entries: 0) == 0 and dead.exists()


def test_a_directory_we_cannot_use_turns_the_journal_off_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with journal_at(str(blocker / "journal")) as j:
        assert j is None
    assert "outcome journal off" in caplog.text and "journal_dir" in caplog.text
    with journal_at("off") as j:
        assert j is None


def _wait(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.01)
    return False


def test_the_writer_journals_each_outcome_and_empties_the_file_once_written(store: Store, tmp_path: Path) -> None:  # noqa: F811
    with OutcomeJournal(tmp_path) as j:
        writer = OutcomeWriter(store, journal=j)
        b, p = batch(store, writer, FakeClock(2000.0))
        p.outcomes = {0: SENT, 1: SENT}
        b.record_final(p, [0, 1])
        b.drain()
        assert _wait(lambda: j.path.read_bytes() == b"")
        assert b.finished == ["Q1"]


def test_the_writer_journals_before_redis_has_it(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """What a worker killed now leaves: the outcome in its journal, not in Redis."""
    seen: list[bytes] = []
    with OutcomeJournal(tmp_path) as j:
        real = store.set_status_list

        def looking(entries: object, **kw: object) -> list[int]:
            seen.append(j.path.read_bytes())
            return real(entries, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "set_status_list", looking)
        writer = OutcomeWriter(store, journal=j)
        b, p = batch(store, writer, FakeClock(2000.0))
        p.outcomes = {0: SENT}
        b.record_final(p, [0])
        b.drain()
    entries, _ = decode(seen[0])
    assert [(q, i, st.state) for q, i, st in entries] == [("Q1", 0, RcptState.DELIVERED)]


def test_a_writer_records_a_dead_processs_outcomes_with_their_events_and_skips_final_ones(
    store: Store,  # noqa: F811
    tmp_path: Path,
) -> None:
    store.events_max = 100
    store.set_status_list([("Q1", 1, DONE)])  # recorded before the process died
    bounced = RecipientStatus(RcptState.BOUNCED, 1, "5.1.1", "550 5.1.1 no such user", "mx.test[192.0.2.1]:25")
    dead = _dead_journal(tmp_path, encode([("Q1", 0, DONE), ("Q1", 1, bounced)]), encode([("GONE", 0, DONE)]))
    with OutcomeJournal(tmp_path) as j:
        writer = OutcomeWriter(store, Feedback(store, 0.0, lambda: 2000.0), journal=j)
        writer.start()  # adopts at once
        assert _wait(lambda: not dead.exists())
    found = store.load_many(["Q1"])[0]
    assert found is not None
    assert found[1][0] == DONE and found[1][1] == DONE  # the final one already there stays as it was
    events = [ev for _, ev in parse_entries(store.redis.xrange(EVENTS))]
    assert [(ev.type.value, ev.queue_id, ev.recipient) for ev in events] == [("delivery", "Q1", "u@y.test")]


def test_a_journal_that_cannot_be_written_is_turned_off_and_the_job_goes_on(
    store: Store,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with OutcomeJournal(tmp_path) as j:

        def full(line: bytes) -> None:
            raise OSError(28, "No space left on device")

        j.append = full  # type: ignore[method-assign]
        writer = OutcomeWriter(store, journal=j)
        b, p = batch(store, writer, FakeClock(2000.0))
        p.outcomes = {0: SENT, 1: SENT}
        b.record_final(p, [0, 1])
        b.drain()  # returns: written without the journal
        assert b.finished == ["Q1"] and writer.journal is None
        assert "outcome journal" in caplog.text and "No space left" in caplog.text
        assert not j.path.exists()


def test_a_writer_closed_with_outcomes_waiting_keeps_its_journal(store: Store, tmp_path: Path) -> None:  # noqa: F811
    with OutcomeJournal(tmp_path) as j:
        writer = OutcomeWriter(store, journal=j)
        writer._lines.append(encode([("Q1", 0, DONE)]))  # as if handed in and not yet written
        writer.close()
        assert writer.journal is None
        probe = subprocess.run([sys.executable, "-c", _PROBE, str(j.path)], capture_output=True, text=True, check=True)
        assert probe.stdout == "held\n"  # locked while this process may still write what waits
    assert j.path.exists()  # kept when the process's journal closes, for the next worker
    with OutcomeJournal(tmp_path / "other") as j:
        writer = OutcomeWriter(store, journal=j)
        writer.close()
        assert not j.path.exists()
