"""When to try a deferred message again, and when to give up: pure arithmetic, no clock.

Postfix's rule (qmgr, ``minimal_backoff_time`` / ``maximal_backoff_time``): after a failed attempt
the next one comes after the message's time in the queue, clamped to ``[min_backoff,
max_backoff]``. A young message is retried soon and often; an old one about once per
``max_backoff``. With the defaults (300 s, 4000 s) the attempts land at roughly 0, 5, 10, 20, 40,
80 minutes, then every 67 minutes.

The end of the queue lifetime is a deadline, not a check that waits for the next regular attempt:
when the next backoff would land past ``received_at + queue_lifetime``, the last attempt is
scheduled exactly at that deadline. So every message gets one final try at the end of its lifetime
and bounces right after it if that fails, never up to ``max_backoff`` late, and a test with a short
lifetime sees attempt, retry, ..., last attempt, bounce. Postfix instead bounces at the first
attempt after the lifetime; the difference is at most one ``max_backoff``.

Mail from ``<>`` (a bounce we could not deliver) has its own, usually shorter, lifetime:
``bounce_lifetime``, as Postfix's ``bounce_queue_lifetime``; nobody is waiting for it and nobody can
be told when it fails. A delay warning (``delay_warning``, Postfix's ``delay_warning_time``) is due
at the first deferral after the message has been queued that long; whether one was already sent is
the store's to say (it is sent once per message).
"""

from __future__ import annotations

__all__ = ["backoff", "delay_warning_due", "expired", "lifetime", "next_retry"]


def backoff(age: float, min_backoff: float, max_backoff: float) -> float:
    """Seconds to wait after a failed attempt of a message ``age`` seconds old (Postfix's rule)."""
    return min(max(age, min_backoff), max_backoff)


def expired(received_at: float, now: float, queue_lifetime: float) -> bool:
    """Whether a message has been in the queue for its whole lifetime: its next failure bounces."""
    return now - received_at >= queue_lifetime


def next_retry(
    received_at: float,
    now: float,
    *,
    min_backoff: float,
    max_backoff: float,
    queue_lifetime: float,
) -> float | None:
    """Seconds from ``now`` until the next attempt after a failure, or None to give up (bounce).

    None when the message has been queued ``queue_lifetime`` seconds or more. Otherwise the
    backoff, shortened so that no attempt lands after the lifetime deadline (see the module
    docstring). A clock that runs behind ``received_at`` counts as age 0.
    """
    if expired(received_at, now, queue_lifetime):
        return None
    age = max(0.0, now - received_at)
    delay = backoff(age, min_backoff, max_backoff)
    remaining = received_at + queue_lifetime - now
    return min(delay, remaining)


def lifetime(is_bounce: bool, queue_lifetime: float, bounce_lifetime: float) -> float:
    """Seconds a message may stay queued: ``bounce_lifetime`` for mail from ``<>`` when set
    (above 0), else ``queue_lifetime``."""
    return bounce_lifetime if is_bounce and bounce_lifetime > 0 else queue_lifetime


def delay_warning_due(received_at: float, now: float, delay_warning: float) -> bool:
    """Whether a deferral at ``now`` is late enough for the delay warning (``delay_warning`` 0 or
    less: never)."""
    return delay_warning > 0 and now - received_at >= delay_warning
