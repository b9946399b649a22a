"""The backoff schedule: Postfix's clamp(age, min, max), with a final attempt at the deadline."""

from __future__ import annotations

import pytest

from worker.retry import backoff, delay_warning_due, expired, lifetime, next_retry

MIN, MAX, LIFE = 300.0, 4000.0, 5 * 86400.0


@pytest.mark.parametrize(
    ("age", "expected"),
    [(0.0, 300.0), (-50.0, 300.0), (299.0, 300.0), (300.0, 300.0), (1200.0, 1200.0), (4000.0, 4000.0), (1e6, 4000.0)],
)
def test_backoff_is_age_clamped(age: float, expected: float) -> None:
    assert backoff(age, MIN, MAX) == expected


def test_next_retry_follows_backoff_inside_the_lifetime() -> None:
    t0 = 1_000_000.0
    assert next_retry(t0, t0 + 5, min_backoff=MIN, max_backoff=MAX, queue_lifetime=LIFE) == MIN
    assert next_retry(t0, t0 + 1000, min_backoff=MIN, max_backoff=MAX, queue_lifetime=LIFE) == 1000
    assert next_retry(t0, t0 + 86400, min_backoff=MIN, max_backoff=MAX, queue_lifetime=LIFE) == MAX


def test_schedule_roughly_doubles_then_levels_off() -> None:
    t0, now, delays = 0.0, 0.0, []
    for _ in range(8):
        delay = next_retry(t0, now, min_backoff=MIN, max_backoff=MAX, queue_lifetime=LIFE)
        assert delay is not None
        delays.append(delay)
        now += delay
    assert delays == [300, 300, 600, 1200, 2400, 4000, 4000, 4000]


def test_last_attempt_is_at_the_deadline_then_give_up() -> None:
    t0 = 0.0
    # 100 s before the deadline: a 4000 s backoff would overshoot, so the last try is at the deadline.
    assert next_retry(t0, LIFE - 100, min_backoff=MIN, max_backoff=MAX, queue_lifetime=LIFE) == 100
    assert next_retry(t0, LIFE, min_backoff=MIN, max_backoff=MAX, queue_lifetime=LIFE) is None
    assert next_retry(t0, LIFE + 1, min_backoff=MIN, max_backoff=MAX, queue_lifetime=LIFE) is None


def test_short_lifetime_gives_attempt_retry_bounce() -> None:
    """A test-sized lifetime: attempts at 0, 1, 2 (the deadline), then the recipient bounces."""
    t0, now, attempts = 0.0, 0.0, [0.0]
    while (delay := next_retry(t0, now, min_backoff=1, max_backoff=1, queue_lifetime=2)) is not None:
        now += delay
        attempts.append(now)
    assert attempts == [0.0, 1.0, 2.0]


def test_no_attempt_is_ever_scheduled_past_the_deadline() -> None:
    t0 = 50.0
    for now in [50.0, 51.0, 300.0, 7000.0, 430000.0, 431999.0]:
        delay = next_retry(t0, t0 + now, min_backoff=MIN, max_backoff=MAX, queue_lifetime=LIFE)
        assert delay is not None
        assert 0 < delay <= MAX
        assert t0 + now + delay <= t0 + LIFE


def test_clock_behind_the_arrival_time_counts_as_new() -> None:
    assert next_retry(1000.0, 990.0, min_backoff=MIN, max_backoff=MAX, queue_lifetime=LIFE) == MIN


def test_expired() -> None:
    assert not expired(0.0, LIFE - 1, LIFE)
    assert expired(0.0, LIFE, LIFE)


def test_bounces_have_their_own_lifetime_when_set() -> None:
    assert lifetime(True, LIFE, 3600.0) == 3600.0
    assert lifetime(False, LIFE, 3600.0) == LIFE  # ordinary mail keeps queue_lifetime
    assert lifetime(True, LIFE, 0.0) == LIFE  # unset: the same as queue_lifetime


def test_a_bounce_gives_up_at_bounce_lifetime() -> None:
    t0, life = 1_000_000.0, lifetime(True, LIFE, 3600.0)
    assert next_retry(t0, t0 + 3000, min_backoff=MIN, max_backoff=MAX, queue_lifetime=life) == 600
    assert next_retry(t0, t0 + 3600, min_backoff=MIN, max_backoff=MAX, queue_lifetime=life) is None
    ordinary = lifetime(False, LIFE, 3600.0)
    assert next_retry(t0, t0 + 3600, min_backoff=MIN, max_backoff=MAX, queue_lifetime=ordinary) == 3600


@pytest.mark.parametrize(
    ("age", "setting", "due"),
    [(14399.0, 14400.0, False), (14400.0, 14400.0, True), (90000.0, 14400.0, True), (90000.0, 0.0, False)],
)
def test_delay_warning_is_due_after_delay_warning_seconds(age: float, setting: float, due: bool) -> None:
    t0 = 1_000_000.0
    assert delay_warning_due(t0, t0 + age, setting) is due
