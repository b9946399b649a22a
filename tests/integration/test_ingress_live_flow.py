"""Mail input flow control against a live ingress, a real redis-server and real workers: with more
delivery jobs unfinished than ``in_flow_backlog`` messages, a MAIL's 250 waits for delivery to catch up (or
``in_flow_delay``); with the backlog gone it is answered at once. No wall-clock windows: the delay
is set far beyond any wait the test makes, or the test only asserts that mail went on."""

from __future__ import annotations

import time
from collections.abc import Callable

from common.metrics import IN_FLOW_HELD
from common.store import STATS
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA
from tests.integration.eventually import eventually, wait_for_log
from tests.integration.smtpwire import Wire
from tests.sinks import SinkServer

ON = "mail input flow control on"


def setup_zone(dns: ZoneServer) -> None:
    dns.add("ours.test.", "MX", "10 mx.ours.test.")
    dns.add("mx.ours.test.", "A", "127.0.0.2")


def held(mta: MTA) -> int:
    return int(mta.redis.hget(STATS, IN_FLOW_HELD) or 0)


def test_mail_waits_until_delivery_catches_up(
    dns: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    setup_zone(dns)
    box = sinks("127.0.0.2")
    # in_flow_delay far beyond any wait below: a 250 can only come from delivery catching up
    mta = mta_factory(in_flow_delay=3600, in_flow_backlog=3)
    mta.start_ingress()
    for i in range(3):  # one commit each, so one delivery job each; no worker runs yet
        mta.send("a@client.test", ["bob@ours.test"], f"Subject: m{i}\r\n\r\nx\r\n")
    log = mta.log_dir / "ingress.log"
    wait_for_log(log, ON)

    with Wire(mta.port) as w:
        w.greet()
        w.send("MAIL FROM:<a@client.test>\r\n")  # held: three jobs unfinished, limit 3
        mta.start_worker()
        assert w.reply().status == (250, "2.1.0"), mta.logs()
        # the 250 came once delivery caught up, never before: fewer than 3 jobs unfinished, so at
        # least one of them delivered (the three usually end together; under load one may be seen
        # alone, and a job a worker has only just taken is still unfinished)
        assert len(box.messages) >= 1, mta.logs()
        assert w.cmd("RCPT TO:<bob@ours.test>").status == (250, "2.1.5")
        assert w.cmd("DATA").code == 354
        assert w.cmd(b"Subject: m3\r\n\r\nx\r\n.").status == (250, "2.0.0")
        # drained: the next MAIL is answered at once (held, it would wait the 3600 s)
        eventually(lambda: len(box.messages) == 4, "the fourth message delivered")
        assert w.cmd("MAIL FROM:<a@client.test>").status == (250, "2.1.0")
    eventually(lambda: held(mta) == 1, "one MAIL counted as held")


def timed_mail(mta: MTA, tag: str) -> tuple[float, str]:
    """One message over a fresh connection: (seconds MAIL FROM waited for its 250, queue id)."""
    with Wire(mta.port) as w:
        w.greet()
        assert w.cmd("EHLO client.test").code == 250
        t0 = time.monotonic()
        assert w.cmd("MAIL FROM:<a@client.test>").status == (250, "2.1.0")
        waited = time.monotonic() - t0
        assert w.cmd("RCPT TO:<bob@ours.test>").status == (250, "2.1.5")
        assert w.cmd("DATA").code == 354
        done = w.cmd(f"Subject: {tag}\r\n\r\nx\r\n.".encode())
        assert done.status == (250, "2.0.0")
        return waited, done.text.rsplit(" ", 1)[-1]


def test_with_no_worker_each_mail_waits_in_flow_delay_and_goes_on(mta_factory: Callable[..., MTA]) -> None:
    # in_flow_delay long against a MAIL's usual milliseconds: that the 250 came no sooner is a lower
    # bound, which a loaded machine can only make longer (no upper bound is asserted)
    delay = 1.5
    mta = mta_factory(in_flow_delay=delay, in_flow_backlog=1)
    mta.start_ingress()
    first = mta.send("a@client.test", ["bob@ours.test"], "Subject: m0\r\n\r\nx\r\n")
    wait_for_log(mta.log_dir / "ingress.log", ON)
    # nobody takes the job: the backlog never falls, yet every message is accepted (slowed, never refused)
    later = [timed_mail(mta, f"m{i}") for i in (1, 2)]
    assert all(waited >= delay * 0.95 for waited, _ in later), later  # each MAIL was held in_flow_delay
    assert sorted(mta.store.queue_ids()) == sorted([first, *(qid for _, qid in later)])
    eventually(lambda: held(mta) == 2, "both later MAILs counted as held")
