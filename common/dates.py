"""Dates as mail writes them (RFC 5322 §3.3): one helper for the Received: header, DSN fields and
anything else that stamps a time into a message."""

from __future__ import annotations

import datetime
from email.utils import format_datetime

__all__ = ["format_date"]


def format_date(ts: float) -> str:
    """An RFC 5322 date in UTC with a numeric zone: ``Mon, 01 Jan 2024 00:00:00 +0000``."""
    return format_datetime(datetime.datetime.fromtimestamp(ts, tz=datetime.UTC))
