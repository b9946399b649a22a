"""Prometheus metrics scraped over HTTP from `mtaq run` after real traffic: mail over TCP, a DNS
server on loopback, sinks that accept, defer and refuse; the values are checked, not only named."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.dnsserver import ZoneServer
from tests.fixtures import ROOT, message, route
from tests.integration.eventually import GENEROUS
from tests.integration.smtpwire import Wire
from tests.ports import free_port, wait_port
from tests.sinks import SinkServer, wait_for


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=GENEROUS) as resp:
        return str(resp.read().decode())


def value(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return None if m is None else float(m.group(1))


def test_metrics_of_mtaq_run_count_real_traffic(
    tmp_path: Path, dns: ZoneServer, mx_port: int, sinks: Callable[..., SinkServer]
) -> None:
    route(dns, "ok.test", "127.0.0.2")
    route(dns, "later.test", "127.0.0.3")
    route(dns, "never.test", "127.0.0.4")
    sinks("127.0.0.2")
    later = sinks("127.0.0.3")
    later.rcpt_default = "451 4.3.0 try again later"
    sinks("127.0.0.4").rcpt_default = "550 5.1.1 no such user"
    port, mport, log = free_port(), free_port(), tmp_path / "run.log"
    env = dict(
        os.environ,
        MTAQ_DNS_SERVERS=f"127.0.0.1:{dns.port}",
        MTAQ_SMTP_PORT=str(mx_port),
        MTAQ_HOSTNAME="mtaq.test",
        MTAQ_CONNECT_TIMEOUT="2",
    )
    argv = [sys.executable, "-m", "mtaq", "run", "--data-dir", str(tmp_path / "var")]
    argv += ["--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{mport}", "--workers", "2"]
    with open(log, "ab") as out:
        p = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port("127.0.0.1", port)
        wait_port("127.0.0.1", mport)
        sizes = []
        with smtplib.SMTP("127.0.0.1", port, timeout=GENEROUS) as s:  # connection 1
            for rcpt in ("a@ok.test", "b@ok.test", "c@ok.test", "d@later.test", "e@never.test"):
                body = message(rcpt, to=rcpt)
                sizes.append(len(body))  # what DATA carries; smtplib sends it as is
                assert s.sendmail("alice@ok.test", [rcpt], body) == {}
        w = Wire(port)  # connection 2: two refused commands
        w.greet()
        assert w.cmd("MAIL FROM:<broken").code == 501
        assert w.cmd("RCPT TO:<x@ok.test>").code == 503
        w.close()

        def settled() -> bool:
            t = scrape(mport)
            return (
                value(t, "mtaq_deliveries_total", '{status="sent"}') == 4  # 3 and the DSN of the bounce
                and value(t, "mtaq_deliveries_total", '{status="bounced"}') == 1
                and value(t, "mtaq_deliveries_total", '{status="deferred"}') == 1
                and value(t, "mtaq_queue_messages", '{state="deferred"}') == 1
                and value(t, "mtaq_connections_total") == 3  # wait_port's probe, and the two above
                # the processes add their counters to Redis every 5 s: wait for them too (a
                # scrape reads counters now, in milliseconds, and can come before that write)
                and value(t, "mtaq_messages_accepted_total") == 5
                and value(t, "mtaq_delivery_latency_seconds_count") == 5
            )

        assert wait_for(settled, GENEROUS, 0.2), scrape(mport) + log.read_text()
        t = scrape(mport)
        assert value(t, "mtaq_messages_accepted_total") == 5
        # the ingress counts the DATA it received (its Received: header is added after)
        assert value(t, "mtaq_received_bytes_total") == sum(sizes), t
        assert value(t, "mtaq_messages_rejected_total", '{code="501"}') == 1
        assert value(t, "mtaq_messages_rejected_total", '{code="503"}') == 1
        assert value(t, "mtaq_delivery_latency_seconds_count") == 5  # 4 sent + 1 bounced: final states
        assert value(t, "mtaq_delivery_latency_seconds_bucket", '{le="+Inf"}') == 5
        assert 0 < (value(t, "mtaq_delivery_latency_seconds_sum") or 0) < 60
        assert value(t, "mtaq_queue_messages", '{state="active"}') == 0
        assert value(t, "mtaq_queue_messages", '{state="held"}') == 0
        assert (value(t, "mtaq_oldest_message_age_seconds") or 0) > 0
        assert value(t, "mtaq_workers_alive") == 2
        assert value(t, "mtaq_retries_total") == 0  # nothing retried yet: the first retry is minutes away
        assert value(t, "mtaq_destination_queue_messages", '{destination="later.test"}') == 1
        assert value(t, "mtaq_redis_up") == 1
        page = scrape(mport, "/")
        assert "later.test" in page and "451 4.3.0 try again later" in page and "Workers alive: 2" in page

        # a real retry: later.test now accepts, and `mtaq queue flush` tries the deferred recipient again
        later.rcpt_default = None
        flush = [sys.executable, "-m", "mtaq", "queue", "--data-dir", str(tmp_path / "var"), "flush"]
        subprocess.run(flush, env=env, cwd=ROOT, check=True, capture_output=True, timeout=GENEROUS)

        def retried() -> bool:
            t = scrape(mport)
            return (
                value(t, "mtaq_retries_total") == 1
                and value(t, "mtaq_deliveries_total", '{status="sent"}') == 5
                and value(t, "mtaq_queue_messages", '{state="deferred"}') == 0
            )

        assert wait_for(retried, GENEROUS, 0.2), scrape(mport) + log.read_text()
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0, log.read_text()
