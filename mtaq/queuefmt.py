"""What `mtaq queue list`, `stats` and `show` print: pure functions from queue views to text that
fits 100 columns (long replies cut with …) and to JSON (whole)."""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from common.envelope import RcptState
from mtaq.ops.queueview import AGE_BUCKETS, MessageView, QueueShape

__all__ = [
    "WIDTH",
    "age_text",
    "cut",
    "list_json",
    "list_lines",
    "list_text",
    "parse_age",
    "show_json",
    "show_text",
    "stats_text",
]

WIDTH = 100
_MARK = {"held": "!", "active": "*", "deferred": " "}  # Postfix's mailq marks: ! on hold, * active


def cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def age_text(seconds: float) -> str:
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """``90``, ``30s``, ``5m``, ``1h``, ``2d``, ``1w`` -> seconds; ValueError otherwise."""
    m = _AGE.fullmatch(text.strip().lower())
    if m is None:
        raise ValueError(f"{text!r} is not an age: say 30s, 5m, 1h or 2d")
    return float(m.group(1)) * _UNIT[m.group(2)]


def list_text(views: Sequence[MessageView], now: float) -> str:
    return "\n".join(list_lines(views, now)) + "\n"


def list_lines(views: Iterable[MessageView], now: float, empty: str = "Mail queue is empty") -> Iterator[str]:
    """Like mailq: a line per message (id and mark, age, size, sender), then its open recipients
    with their state, under the last reply of the deferred ones; lines as the views come (a
    listing of a long queue streams), the total last."""
    total = n = 0
    for v in views:
        if not n:
            yield f"{'-Queue ID-':<21}{'-Age-':>7} {'-Size-':>9}  -Sender/Recipient-"
        n += 1
        total += v.size
        sender = v.envelope.sender or "MAILER-DAEMON"
        head = f"{v.qid + _MARK[v.state]:<21}{age_text(v.age(now)):>7} {v.size:>9}  "
        yield head + cut(sender, WIDTH - len(head))
        for r in v.open:
            if r.state is RcptState.DEFERRED and r.status.reply:
                yield " " * 10 + "(" + cut(r.status.reply, WIDTH - 12) + ")"
            tries = f", {r.status.attempts} tr{'y' if r.status.attempts == 1 else 'ies'}" if r.status.attempts else ""
            label = f"held ({r.state.value}{tries})" if v.held else f"{r.state.value}{tries}"
            line = f"{'':10}{label:<30}"
            yield line + cut(r.address, WIDTH - len(line))
        yield ""
    if not n:
        yield empty
        return
    yield f"-- {total // 1024} Kbytes in {n} Request{'s' if n != 1 else ''}."


def _rcpt_json(v: MessageView) -> list[dict[str, Any]]:
    return [
        {
            "address": r.address,
            "destination": r.destination,
            "state": r.state.value,
            "attempts": r.status.attempts,
            "dsn": r.status.dsn,
            "reply": r.status.reply,
            "relay": r.status.relay,
            "tls": r.status.tls or None,
            "updated": r.status.updated or None,
            "next_attempt": r.status.next_attempt or None,
        }
        for r in v.recipients
    ]


def list_json(views: Sequence[MessageView], now: float) -> list[dict[str, Any]]:
    return [
        {
            "id": v.qid,
            "state": v.state,
            "held": v.held,
            "arrival": v.envelope.received_at,
            "age_seconds": round(v.age(now), 3),
            "size": v.size,
            "sender": v.envelope.sender,
            "recipients": _rcpt_json(v),
        }
        for v in views
    ]


def show_json(v: MessageView, headers: list[tuple[str, str]], body: bytes | None, now: float) -> dict[str, Any]:
    env = v.envelope
    out: dict[str, Any] = {
        **list_json([v], now)[0],
        "envelope": {
            "helo": env.helo,
            "client_addr": env.client_addr,
            "client_name": env.client_name,
            "protocol": env.protocol,
            "body_8bit": env.body_8bit,
            "smtputf8": env.smtputf8,
            "ret": env.ret,
            "envid": env.envid,
            "auth_user": env.auth_user,
            "trusted": env.trusted,
        },
        "headers": [[k, val] for k, val in headers],
    }
    if body is not None:
        out["body"] = body.decode("utf-8", "replace")
    return out


def show_text(v: MessageView, headers: list[tuple[str, str]], now: float) -> str:
    env = v.envelope
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(env.received_at))
    lines = [
        f"queue id:   {v.qid} ({v.state})",
        f"arrival:    {when} ({age_text(v.age(now))} ago)",
        f"size:       {v.size}",
        f"sender:     <{env.sender}>",
        f"client:     {env.client_name}[{env.client_addr}] helo={env.helo} {env.protocol}"
        + (f" auth={env.auth_user}" if env.auth_user else ""),
        "recipients:",
    ]
    for r in v.recipients:
        st = r.status
        lines.append(f"  <{r.address}> via {r.destination}: {st.state.value}, {st.attempts} attempt(s)")
        if st.updated:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.updated))
            tls = f", tls={st.tls}" if st.tls else ""
            lines.append(f"    last attempt {stamp}, relay={st.relay or 'none'}{tls}, dsn={st.dsn or '-'}")
        if st.reply:
            lines.append(f"    ({st.reply})")
        if st.state is RcptState.DEFERRED and st.next_attempt:
            lines.append(f"    next attempt in {age_text(st.next_attempt - now)}")
    lines.append("headers:")
    lines += [cut(f"  {k}: {val}", WIDTH) for k, val in headers]
    return "\n".join(lines) + "\n"


def stats_text(
    shape: QueueShape,
    jobs: dict[str, int],
    workers: int,
    totals: dict[str, int],
    throttled: Sequence[tuple[str, str, float]],
    top: int = 20,
) -> str:
    """Counts by state, qshape's table per destination, jobs, workers, throttled destinations."""
    out = [
        f"messages in queue: {shape.messages} ({shape.size // 1024} Kbytes)",
        "  " + ", ".join(f"{n} {s}" for s, n in shape.by_state.items()),
        "recipients open: "
        + (
            ", ".join(
                f"{n} {s}"
                for s, n in sorted(shape.recipients_by_state.items())
                if s in ("pending", "deferred", "held") and n
            )
            or "none"
        ),
        "",
    ]
    names = [n for n, _ in AGE_BUCKETS]
    dw = max([len("destination")] + [len(d) for d, _ in shape.top_destinations(top)])
    dw = min(dw, WIDTH - 7 * 8 - 8)
    out.append(f"{'destination':<{dw}} {'total':>6}" + "".join(f"{n:>8}" for n in names))
    totals_row = shape.totals()
    out.append(f"{'TOTAL':<{dw}} {sum(totals_row):>6}" + "".join(f"{n:>8}" for n in totals_row))
    for dest, row in shape.top_destinations(top):
        out.append(f"{cut(dest, dw):<{dw}} {sum(row):>6}" + "".join(f"{n:>8}" for n in row))
    if len(shape.destinations) > top:
        out.append(f"... and {len(shape.destinations) - top} more destination(s)")
    out.append("")
    out.append("jobs: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in jobs.items()))
    out.append(f"workers alive: {workers}")
    if throttled:
        out.append("destinations throttled or down:")
        for dest, why, ttl in throttled:
            head = f"  {dest} for {age_text(ttl)}: "
            out.append(head + cut(why, WIDTH - len(head)))
    if shape.reasons:
        out.append("top deferral reasons:")
        for reason, n in shape.reasons.most_common(5):
            klass = shape.reason_class.get(reason, "")
            out.append(f"  {n:>6}  " + cut(f"[{klass}] {reason}" if klass else reason, WIDTH - 10))
    shown = ", ".join(f"{k} {v}" for k, v in sorted(totals.items()) if ":" not in k and "latency" not in k)
    out += textwrap.wrap("totals since Redis started: " + shown, WIDTH, subsequent_indent="  ")
    return "\n".join(out) + "\n"
