"""The status page served over HTTP: a queue with mail deferred to several destinations in a real
redis-server, an hour of samples written by the sampler under an injected clock, the page served by
the monitoring listener. The HTML itself is checked as served (the page has no scripts: what the
server sends is what a browser shows); a real headless browser (Debian's chromium) then renders it,
and the DOM it built and a screenshot are checked too, where chromium is installed."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.store import Message, Store
from mtaq.ops.exporter import Monitor, MonitorServer
from tests.ports import free_port
from tests.redisserver import RedisServer
from tests.tools import require


def _queue(store: Store, now: float) -> None:
    """Deferred mail to two domains (of different ages), one message waiting, one delivered."""
    msgs = []
    for n, (rcpts, age) in enumerate(
        [
            (["a@slow.example"], 30),
            (["b@slow.example", "c@down.example"], 700),
            (["d@down.example"], 3000),
            (["e@new.example"], 5),
        ]
    ):
        env = Envelope(id=f"{0xABC000 + n:X}TEST", sender="alice@client.test", recipients=[Recipient(r) for r in rcpts])
        env.received_at = now - age
        msgs.append(Message(env, b"Subject: t\r\n\r\nhello\r\n"))
    store.commit(msgs)
    deferred = RecipientStatus(
        state=RcptState.DEFERRED, attempts=1, dsn="4.4.1", reply="connect to x: Connection refused"
    )
    slow = RecipientStatus(state=RcptState.DEFERRED, attempts=2, dsn="4.2.0", reply="451 4.2.0 greylisted, try later")
    store.set_statuses(
        {
            msgs[0].envelope.id: {0: slow},
            msgs[1].envelope.id: {0: slow, 1: deferred},
            msgs[2].envelope.id: {0: deferred},
        }
    )


@pytest.fixture(scope="module")
def status_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The status page of a queue with deferred mail and an hour of samples, served over HTTP."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        r = server.client()
        store = Store(r)
        now = time.time()
        _queue(store, now)
        clock = [now - 3600.0]
        mon = Monitor(r, hostname="mx.test", clock=lambda: clock[0])
        for minute in range(61):  # the sampler once a minute for the last hour, the queue rising and falling
            clock[0] = now - 3600.0 + 60 * minute
            r.hincrby("mtaq:stats", "delivered", 5 + minute % 12)
            pads = {f"PAD{i}": 0.0 for i in range(int(12 + 10 * math.sin(minute / 6)))}
            if pads:
                r.zadd("mtaq:index", pads)
            assert mon.sample(60.0)
            r.zrem("mtaq:index", *[f"PAD{i}" for i in range(30)])
            r.delete("mtaq:samples-lock")  # the next minute has come
        clock[0] = now
        port = free_port(["127.0.0.1"])
        httpd = MonitorServer(f"127.0.0.1:{port}", mon)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            httpd.shutdown()
            httpd.server_close()


def check_page(html: str) -> None:
    """What the page must show: the host, the deferred destinations with their last replies, a chart
    with a point per sample."""
    assert "<h1>mtaq on mx.test</h1>" in html, html[:2000]
    shape = re.search(r'<table id="shape">(.*?)</table>', html, re.S)
    assert shape is not None
    dests = re.findall(r'<td class="dest">([^<]+)</td>', shape.group(1))
    assert set(dests) == {"slow.example", "down.example", "new.example"}
    assert "greylisted, try later" in html and "Connection refused" in html
    chart = re.search(r'<svg id="chart".*?</svg>', html, re.S)
    assert chart is not None
    depth = re.findall(r'<circle class="pt depth"', chart.group(0))
    rate = re.findall(r'<circle class="pt rate"', chart.group(0))
    assert len(depth) >= 60 and len(rate) >= 59, chart.group(0)[:500]
    points = re.search(r'<polyline class="depth" fill="none" points="([^"]+)"', chart.group(0))
    assert points is not None and len(points.group(1).split()) >= 60


def test_status_page_html_as_served(status_url: str) -> None:
    with urllib.request.urlopen(status_url, timeout=60) as resp:
        assert resp.status == 200 and resp.headers.get_content_type() == "text/html"
        html = resp.read().decode()
    check_page(html)


def test_status_page_renders_in_headless_chromium(status_url: str, tmp_path: Path) -> None:
    browser = require("chromium", "chromium-browser", "google-chrome")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    args.append(f"--user-data-dir={tmp_path / 'profile'}")
    dom = subprocess.run([*args, "--dump-dom", status_url], capture_output=True, text=True, timeout=120)
    check_page(dom.stdout)  # the DOM the browser built from it
    shot = tmp_path / "status.png"
    subprocess.run(
        [*args, f"--screenshot={shot}", "--window-size=1000,1400", status_url], capture_output=True, timeout=120
    )
    assert shot.exists() and shot.stat().st_size > 10_000, dom.stderr[-2000:]  # a real rendering, not an error page
    print(f"status page screenshot: {shot}", file=sys.stderr)
