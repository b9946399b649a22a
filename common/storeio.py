"""How the store's writes reach Redis: its errors as the store's own (StoreUnavailable, StoreFull),
never a redis-py exception, so that callers decide what to answer without knowing redis-py; and a
pipeline that waits for replicas (redis_min_replicas). common/store.py uses them and re-exports the
errors."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis

from common.redisconn import NoReplicasError

__all__ = [
    "Replicated",
    "Ride",
    "StoreError",
    "StoreFull",
    "StoreNotReplicated",
    "StoreUnavailable",
    "reply_text",
    "translated",
]

log = logging.getLogger("mtaq.store")

# Commands of another owner's that go in a round trip a caller makes anyway: the function queues
# them in the pipeline and returns the one their answers go to once it has run (None: nothing
# queued). Used by the job's load, RQ's start of a job and the outcome writes (issue 15).
Ride = Callable[[Any], Callable[[Sequence[Any]], None] | None]


def reply_text(v: Any, errors: str = "strict") -> str:
    """A Redis reply's bytes (or a decoded client's str) as str: every reader's one conversion.
    ``errors="replace"`` where the bytes are anyone's (an event's fields, a published message)."""
    return v.decode("utf-8", errors) if isinstance(v, bytes) else str(v)


class StoreError(Exception):
    """Nothing was stored."""


class StoreUnavailable(StoreError):
    """Redis is unreachable, timed out or failed: try again later (SMTP 451 4.3.0)."""


class StoreFull(StoreError):
    """Redis refuses to grow (OOM under noeviction): try again later (SMTP 452 4.3.1)."""


class StoreNotReplicated(StoreUnavailable):
    """Written on the primary, but fewer replicas than asked acknowledged it in time: not yet safe
    from the loss of that machine (SMTP 451 4.3.0: the client retries; at-least-once allows the
    second copy that may follow)."""


class Replicated(redis.client.Pipeline):
    """A pipeline that sends ``WAIT replicas timeout`` on its own connection right after its
    commands, before the connection goes back to the pool: WAIT counts the replicas that have this
    connection's writes, so it must follow them on the same socket. (A retry after a dropped
    connection runs the commands again, and WAIT again after them.)"""

    replicas = 1
    timeout_ms = 1000
    # True (the ingress): too few replicas is StoreNotReplicated at once, a 451. False (a worker's
    # outcomes, which have happened): WAIT again until ``patience`` seconds have passed, then
    # StoreNotReplicated, and the job is run again. Going on with a write no replica has lets a
    # job end on the new primary while its outcomes sit on a primary that hung through a failover
    # and is about to be resynced (docs/high-availability.md "One primary at a time").
    strict = True
    patience = 5.0

    def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: Any) -> Any:
        result = super()._execute_transaction(connection, commands, raise_on_error)
        self._wait(connection)
        return result

    def _execute_pipeline(self, connection: Any, commands: Any, raise_on_error: Any) -> Any:
        result = super()._execute_pipeline(connection, commands, raise_on_error)  # type: ignore[no-untyped-call]
        self._wait(connection)
        return result

    def _wait(self, connection: Any) -> None:
        deadline = time.monotonic() + (0.0 if self.strict else self.patience)
        said = False
        while True:
            connection.send_command("WAIT", self.replicas, self.timeout_ms)
            acked = int(connection.read_response())
            if acked >= self.replicas:
                return
            why = f"{acked} of {self.replicas} replica(s) acknowledged the write within {self.timeout_ms} ms"
            if time.monotonic() >= deadline:
                raise StoreNotReplicated(why)
            if not said:
                log.warning("written on the primary only so far (%s): waiting up to %.0f s", why, self.patience)
                said = True


def _is_full(e: redis.RedisError) -> bool:
    # redis-py maps the "OOM" error prefix to OutOfMemoryError and strips it from the text; inside
    # MULTI/EXEC the text becomes "Command # 1 (HSET ...) of pipeline caused error: command not
    # allowed when used memory > 'maxmemory'." Match the class, and the text for other clients.
    if isinstance(e, redis.exceptions.OutOfMemoryError):
        return True
    return isinstance(e, redis.ResponseError) and (str(e).startswith("OOM") or "maxmemory" in str(e))


@contextlib.contextmanager
def translated() -> Iterator[None]:
    try:
        yield
    except NoReplicasError as e:
        # refused whole for want of replicas in sync (the ha set-up's fence): not written, and
        # not a primary lost mid-write that the ingress would wait to settle
        raise StoreNotReplicated(str(e)) from e
    except redis.RedisError as e:
        raise (StoreFull if _is_full(e) else StoreUnavailable)(str(e)) from e
    except OSError as e:  # a socket error redis-py did not wrap
        raise StoreUnavailable(str(e)) from e
