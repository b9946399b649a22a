"""Whether this worker process takes another job: only while fewer than ``want`` messages wait in
it for a conversation (issue 15).

RQ hands a worker jobs, not messages. With a job per destination per group commit (one or two
messages), job slots were enough; a drain job (common/jobqueue.py) takes up to ``draw`` messages,
and a worker that took a job for every free slot would hold ten times what its conversations can
send while another worker process's conversations wait. So a worker takes a job only while the
parcels waiting in its lanes (taken by no conversation yet), with the shares of the jobs that have
not put theirs there yet, come to fewer than ``want`` (fewer than one share while all its
conversation permits are in use): its conversations always have the next message at hand, the rest
stays pending for whichever process has room, and the jobs stay large (RQ's bookkeeping is paid
per job)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["POLL", "Intake"]

POLL = 0.05  # seconds between looks at the lanes while no job may be taken (conversations take parcels)


class Intake:
    def __init__(
        self,
        want: int,
        draw: int,
        waiting: Callable[[], int],
        *,
        free: Callable[[], int] = lambda: 1,
        busy: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.want = max(1, want)
        self.draw = max(1, draw)
        # what may wait here while every conversation permit is in use: one round of this
        # process's conversations with a destination (0: a drain job's share). A share is two
        # rounds (common/jobqueue.py), so it cannot be the bound: with every permit busy a process
        # would take jobs until twice its conversations waited in it
        self.busy = max(1, busy or draw)
        self.waiting = waiting  # parcels in this process's lanes that no conversation has taken
        self.free = free  # conversation permits not in use
        self.clock = clock
        self._reserved: dict[str, int] = {}  # job id -> messages it will add to the lanes
        self._cond = threading.Condition()

    @property
    def load(self) -> int:
        """Messages waiting here for a conversation, or about to."""
        with self._cond:
            reserved = sum(self._reserved.values())
        return reserved + self.waiting()

    def has_room(self) -> bool:
        """Fewer than ``want`` messages wait here; and while every conversation permit is in use,
        fewer than ``busy``: what waits then waits for a conversation of this process
        to end, while another process with a free one could send it now (bench.slowdest: with
        every permit of one worker busy, 33 messages for one destination waited in it for a
        second while the other worker had permits to spare, and the last messages needed another
        round of the destinations' 1 s at DATA)."""
        load = self.load
        return load < self.want and (load < self.busy or self.free() > 0)

    def wait_room(self, timeout: float) -> bool:
        """Whether there is room here (``has_room``), waiting up to ``timeout`` seconds."""
        deadline = self.clock() + timeout
        while not self.has_room():
            left = deadline - self.clock()
            if left <= 0:
                return False
            with self._cond:
                self._cond.wait(min(POLL, left))
        return True

    def begin(self, job_id: str, size: int | None) -> None:
        """A job starts (RQ's main loop, before its thread): ``size`` messages it names, or None
        for a drain job, which takes a share of ``draw``: counted now, so that the loop does not
        take another job before this one's parcels are in a lane."""
        with self._cond:
            self._reserved[job_id] = self.draw if size is None else size

    def share(self, job_id: str) -> int:
        """How many messages drain job ``job_id`` may take (``draw`` if it was never begun here)."""
        with self._cond:
            return self._reserved.get(job_id, self.draw) or self.draw

    def landed(self, job_id: str) -> None:
        """The job's parcels are in their lane (the lanes count them now), or it has none."""
        with self._cond:
            if job_id in self._reserved:
                self._reserved[job_id] = 0
                self._cond.notify_all()

    def end(self, job_id: str) -> None:
        with self._cond:
            self._reserved.pop(job_id, None)
            self._cond.notify_all()
