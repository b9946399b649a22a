"""Dates as mail writes them (RFC 5322 §3.3): one helper for the Received: header, DSN fields and
anything else that stamps a time into a message."""

from __future__ import annotations

import datetime
import functools
import math
from email.utils import format_datetime

__all__ = ["format_date"]


def format_date(ts: float) -> str:
    """An RFC 5322 date in UTC with a numeric zone: ``Mon, 01 Jan 2024 00:00:00 +0000`` (the second
    ``ts`` falls in)."""
    return _format_second(math.floor(ts))


@functools.lru_cache(maxsize=4)
def _format_second(second: int) -> str:
    # every message the ingress takes is stamped (Received:, a missing Date:): under load hundreds
    # a second, each ~4 us through the email package, all with the same few seconds
    return format_datetime(datetime.datetime.fromtimestamp(second, tz=datetime.UTC))
