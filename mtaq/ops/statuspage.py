"""The status page: one self-contained HTML document (no scripts, no external assets, works offline)
with the queue shape per destination, the top deferral reasons, the workers alive, and an inline
SVG chart of queue depth and delivery rate over the last hour. Pure: data in, text out."""

from __future__ import annotations

import html
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mtaq.ops.queueview import AGE_BUCKETS, QueueShape

__all__ = ["Sample", "WorkerInfo", "chart_svg", "render", "sample_from_json"]

REFRESH_SECONDS = 30
CHART_W, CHART_H, PAD = 720, 220, 40


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    depth: int  # messages in the queue
    done: int  # recipients delivered or bounced so far (a counter)

    def to_json(self) -> str:
        return json.dumps({"t": round(self.t, 3), "depth": self.depth, "done": self.done}, separators=(",", ":"))


def sample_from_json(raw: str | bytes) -> Sample:
    d = json.loads(raw)
    return Sample(float(d["t"]), int(d["depth"]), int(d["done"]))


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    name: str
    hostname: str
    pid: int | None
    state: str
    heartbeat_age: float | None  # seconds since the last heartbeat


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def rates(samples: Sequence[Sample]) -> list[tuple[float, float]]:
    """Deliveries per minute between consecutive samples, at the later sample's time (a counter that
    went back, after a Redis reset, counts as zero)."""
    out: list[tuple[float, float]] = []
    for a, b in itertools.pairwise(samples):
        dt = b.t - a.t
        if dt > 0:
            out.append((b.t, max(0, b.done - a.done) * 60.0 / dt))
    return out


def _polyline(points: Sequence[tuple[float, float]], t0: float, t1: float, vmax: float, css: str) -> str:
    if not points:
        return ""
    w, h = CHART_W - 2 * PAD, CHART_H - 2 * PAD
    span = max(1e-9, t1 - t0)
    coords = " ".join(
        f"{PAD + (t - t0) / span * w:.1f},{PAD + h - (v / vmax * h if vmax else 0):.1f}" for t, v in points
    )
    dots = "".join(
        f'<circle class="pt {css}" r="2" cx="{PAD + (t - t0) / span * w:.1f}" '
        f'cy="{PAD + h - (v / vmax * h if vmax else 0):.1f}"><title>{v:.0f}</title></circle>'
        for t, v in points
    )
    return f'<polyline class="{css}" fill="none" points="{coords}"/>{dots}'


def chart_svg(samples: Sequence[Sample], now: float, window: float = 3600.0) -> str:
    """Queue depth (messages) and delivery rate (per minute) over the last ``window`` seconds."""
    t0 = now - window
    recent = [s for s in samples if s.t >= t0 - 120]
    depth = [(s.t, float(s.depth)) for s in recent if s.t >= t0]
    rate = [(t, r) for t, r in rates(recent) if t >= t0]
    # headroom above the highest point, so that a flat line does not run along the frame
    dtop = max([v for _, v in depth] + [1.0])
    rtop = max([v for _, v in rate] + [1.0])
    dmax, rmax = dtop * 1.2, rtop * 1.2
    w, h = CHART_W - 2 * PAD, CHART_H - 2 * PAD
    ticks = "".join(
        f'<text x="{PAD + i / 4 * w:.0f}" y="{CHART_H - 12}" text-anchor="middle">-{60 - i * 15}m</text>'
        for i in range(5)
    )
    body = (
        _polyline(depth, t0, now, dmax, "depth")
        + _polyline(rate, t0, now, rmax, "rate")
        + (
            ""
            if depth
            else f'<text x="{CHART_W / 2:.0f}" y="{CHART_H / 2:.0f}" text-anchor="middle">no samples yet</text>'
        )
    )
    return (
        f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
        f'viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="queue depth and delivery rate, last hour">'
        f'<rect x="{PAD}" y="{PAD}" width="{w}" height="{h}" fill="#fafafa" stroke="#ccc"/>'
        f'<text x="{PAD}" y="{PAD - 8}" class="depth-label">queue depth (max {dtop:.0f} messages)</text>'
        f'<text x="{CHART_W - PAD}" y="{PAD - 8}" text-anchor="end" class="rate-label">'
        f"delivery rate (max {rtop:.0f}/min)</text>"
        f"{ticks}{body}</svg>"
    )


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ddd;padding:.2em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
td.reason{text-align:left;font-family:monospace}
.depth{stroke:#1f77b4;stroke-width:2}.pt.depth{fill:#1f77b4}.depth-label{fill:#1f77b4}
.rate{stroke:#d62728;stroke-width:2}.pt.rate{fill:#d62728}.rate-label{fill:#d62728}
svg text{font-size:11px}
.bad{color:#b00}
"""


def _redis_block(lines: Sequence[str]) -> str:
    """Replication (common/replication.py lines): the primary, its replicas, the last failover."""
    if not lines:
        return ""
    return '<pre id="redis">' + "\n".join(_esc(line) for line in lines) + "</pre>"


def render(
    shape: QueueShape,
    workers: Sequence[WorkerInfo],
    samples: Sequence[Sample],
    *,
    hostname: str,
    stats: dict[str, int],
    problems: Sequence[str] = (),
    redis_lines: Sequence[str] = (),
) -> str:
    now = shape.now
    rows = "".join(
        f'<tr><td class="dest">{_esc(d)}</td><td>{sum(row)}</td>' + "".join(f"<td>{n}</td>" for n in row) + "</tr>"
        for d, row in shape.top_destinations(50)
    )
    totals = shape.totals()
    head = "".join(f"<th>{_esc(name)}</th>" for name, _ in AGE_BUCKETS)
    qtable = (
        f'<table id="shape"><tr><th>destination</th><th>total</th>{head}</tr>'
        f"<tr><td><b>TOTAL</b></td><td><b>{sum(totals)}</b></td>"
        + "".join(f"<td><b>{n}</b></td>" for n in totals)
        + f"</tr>{rows}</table>"
        if shape.destinations
        else "<p>The queue is empty.</p>"
    )
    reasons = (
        '<table id="reasons"><tr><th>deferral reason</th><th>recipients</th></tr>'
        + "".join(f'<tr><td class="reason">{_esc(r)}</td><td>{c}</td></tr>' for r, c in shape.reasons.most_common(10))
        + "</table>"
        if shape.reasons
        else "<p>No deferred recipients.</p>"
    )
    wrows = "".join(
        f"<tr><td>{_esc(w.name)}</td><td>{_esc(w.hostname)}</td><td>{_esc(w.pid or '')}</td><td>{_esc(w.state)}</td>"
        f"<td>{'' if w.heartbeat_age is None else f'{w.heartbeat_age:.0f}s ago'}</td></tr>"
        for w in workers
    )
    wtable = (
        f'<table id="workers"><tr><th>worker</th><th>host</th><th>pid</th><th>state</th><th>heartbeat</th></tr>'
        f"{wrows}</table>"
        if workers
        else '<p class="bad">No worker is alive: nothing is being delivered.</p>'
    )
    states = ", ".join(f"{n} {s}" for s, n in shape.by_state.items())
    oldest = "" if shape.oldest is None else f"; oldest {now - shape.oldest:.0f}s"
    counters = ", ".join(
        f"{k} {stats.get(k, 0)}" for k in ("accepted", "delivered", "bounced", "deferred", "connections")
    )
    alerts = "".join(f'<p class="bad">{_esc(p)}</p>' for p in problems)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mtaq on {_esc(hostname)}</title><style>{_CSS}</style></head>
<body>
<h1>mtaq on {_esc(hostname)}</h1>
<p>{stamp}, refreshes every {REFRESH_SECONDS}s. <a href="/metrics">metrics</a></p>
{alerts}
<h2>Queue: {shape.messages} message(s), {shape.size // 1024} KiB</h2>
<p id="states">{_esc(states)}{oldest}</p>
<p>Totals since Redis started: {_esc(counters)}</p>
{_redis_block(redis_lines)}
<h2>Last hour</h2>
{chart_svg(samples, now)}
<h2>Queue shape (messages per destination by age)</h2>
{qtable}
<h2>Top deferral reasons</h2>
{reasons}
<h2>Workers alive: {len(workers)}</h2>
{wtable}
</body></html>
"""
