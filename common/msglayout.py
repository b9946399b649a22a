"""A message hash's two layouts (common/statusscript.py LAYOUT): recipients' states as its own
fields ``r<n>`` (one key a message), or, in the older layout, in ``mtaq:rcpt:<id>``; what reads
either. Pure: common/store.py and the queue listing (mtaq/ops/queueview.py) read Redis."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from common.envelope import RecipientStatus
from common.statusscript import LAYOUT_INLINE

__all__ = ["field", "hold_flag", "is_inline", "state_field", "states_listed", "states_of", "states_of_older"]


def state_field(index: int) -> str:
    """The field of a message hash that holds recipient ``index``'s state (LAYOUT_INLINE)."""
    return f"r{index}"


def states_of(fields: Mapping[Any, Any]) -> dict[int, RecipientStatus]:
    """Recipient states from a message hash's fields (HGETALL, or the ``r<n>`` ones): those tried."""
    out: dict[int, RecipientStatus] = {}
    for k, v in fields.items():
        name = k.decode() if isinstance(k, bytes) else k
        if name[:1] == "r" and name[1:].isdigit():
            out[int(name[1:])] = RecipientStatus.from_json(v)
    return out


def states_listed(values: Sequence[Any]) -> dict[int, RecipientStatus]:
    """Recipient states from an HMGET of the fields ``r0``, ``r1`` ... in order: those tried."""
    return {i: RecipientStatus.from_json(v) for i, v in enumerate(values) if v is not None}


def states_of_older(fields: Mapping[Any, Any]) -> dict[int, RecipientStatus]:
    """Recipient states from the ``mtaq:rcpt:<id>`` hash of a message an older mtaq queued."""
    return {int(k): RecipientStatus.from_json(v) for k, v in fields.items()}


def is_inline(layout: Any) -> bool:
    """Whether a message hash's ``v`` field says its states are in it (else: the older keys)."""
    return layout in (LAYOUT_INLINE, LAYOUT_INLINE.encode())


def field(h: Mapping[Any, Any], name: str) -> Any:
    """A field of an HGETALL answer, whether the client decodes responses or not."""
    got = h.get(name.encode())
    return h.get(name) if got is None else got


def hold_flag(summary: Any) -> bool | None:
    """Whether a message's summary (its field ``q``) says it is held; None when the summary does
    not keep the flag (``k``: an older mtaq's, or none), and the hold set has to say."""
    if summary is None:
        return None
    try:
        q = json.loads(summary)
    except ValueError:
        return None
    if not isinstance(q, dict) or not q.get("k"):
        return None
    return q.get("g") == 1
