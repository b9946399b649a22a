"""Backpressure against a live ingress: a queue over ``max_queue`` and a Redis out of memory both
answer ``452 4.3.1`` (never ``250`` for mail that is not stored, never ``451``), and what was
accepted before is delivered once a worker runs."""

from __future__ import annotations

import email
from collections.abc import Callable
from pathlib import Path

from tests.dnsserver import ZoneServer
from tests.fixtures import MTA
from tests.integration.eventually import GENEROUS, eventually
from tests.integration.smtpwire import Wire
from tests.redisserver import RedisServer
from tests.sinks import SinkServer, wait_for

FULL = (452, "4.3.1")


def subjects(box: SinkServer) -> list[str]:
    return sorted(str(email.message_from_bytes(m[2])["Subject"]) for m in box.messages)


def setup_zone(dns: ZoneServer) -> None:
    dns.add("ours.test.", "MX", "10 mx.ours.test.")
    dns.add("mx.ours.test.", "A", "127.0.0.2")


def queued(text: str) -> str:
    assert text.startswith("2.0.0 Ok: queued as "), text
    return text.rsplit(" ", 1)[-1]


def test_max_queue(dns: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]) -> None:
    setup_zone(dns)
    box = sinks("127.0.0.2")
    mta = mta_factory(max_queue=2)
    mta.start_ingress()
    early = Wire(mta.port)  # begins its transaction while there is room
    early.greet()
    assert early.cmd("MAIL FROM:<a@client.test>").status == (250, "2.1.0")
    assert early.cmd("RCPT TO:<bob@ours.test>").status == (250, "2.1.5")
    ids = [mta.send("a@client.test", ["bob@ours.test"], f"Subject: m{i}\r\n\r\nx\r\n") for i in (1, 2)]
    with Wire(mta.port) as late:
        late.greet()
        assert late.cmd("MAIL FROM:<a@client.test>").status == FULL
        assert late.cmd("NOOP").status == (250, "2.0.0")
    # the gate again at the end of DATA, for the transaction begun before the queue filled
    assert early.cmd("DATA").code == 354
    assert early.cmd(b"Subject: m3\r\n\r\nx\r\n.").status == FULL
    assert early.cmd("NOOP").status == (250, "2.0.0")  # not an error: the client retries later
    assert early.cmd("MAIL FROM:<a@client.test>").status == FULL
    assert sorted(mta.store.queue_ids()) == sorted(ids)

    mta.start_worker()
    assert wait_for(lambda: len(box.messages) == 2, GENEROUS), mta.logs()
    assert subjects(box) == ["m1", "m2"]
    assert wait_for(lambda: mta.store.queue_size() == 0, GENEROUS), mta.logs()
    # the queue drained: the ingress accepts again (its view of the queue refreshes every second)
    statuses: list[tuple[int, str]] = []

    def accepted_again() -> bool:
        statuses.append(early.cmd("MAIL FROM:<a@client.test>").status)
        return statuses[-1] != FULL

    eventually(accepted_again, "mail accepted again with an empty queue", interval=0.2)
    assert statuses[-1] == (250, "2.1.0")
    assert early.cmd("RCPT TO:<bob@ours.test>").status == (250, "2.1.5")
    assert early.cmd("DATA").code == 354
    assert early.cmd(b"Subject: m3\r\n\r\nx\r\n.").status == (250, "2.0.0")
    early.close()
    assert wait_for(lambda: len(box.messages) == 3, GENEROUS), mta.logs()
    assert subjects(box) == ["m1", "m2", "m3"]


def test_redis_out_of_memory(dns: ZoneServer, sinks: Callable[..., SinkServer], mx_port: int, tmp_path: Path) -> None:
    setup_zone(dns)
    box = sinks("127.0.0.2")
    with RedisServer(tmp_path / "small-redis", maxmemory="3mb") as small:
        mta = MTA(small.url, dns.port, mx_port, tmp_path, commit_max_messages=4)
        try:
            mta.start_ingress()
            accepted: dict[str, str] = {}  # queue id -> subject
            refused_at = None
            body = b"x" * 998 + b"\r\n"
            with Wire(mta.port) as w:
                w.greet()
                for i in range(300):
                    mail = w.cmd("MAIL FROM:<a@client.test>")
                    if mail.status == FULL:
                        refused_at = ("MAIL", i)
                        break
                    assert mail.status == (250, "2.1.0"), mail
                    assert w.cmd("RCPT TO:<bob@ours.test>").status == (250, "2.1.5")
                    assert w.cmd("DATA").code == 354
                    done = w.cmd(f"Subject: oom{i}\r\n\r\n".encode() + body * 50 + b".")  # 50 kB
                    if done.status == FULL:
                        refused_at = ("DATA", i)
                        break
                    assert done.status == (250, "2.0.0"), done  # never 451, never a lost 250
                    accepted[queued(done.text)] = f"oom{i}"
                assert refused_at is not None, "Redis never filled up"
                assert w.cmd("NOOP").status == (250, "2.0.0")
                assert w.cmd("MAIL FROM:<a@client.test>").status in (FULL, (250, "2.1.0"))
            assert len(accepted) >= 5, refused_at
            # every 250 is a message in Redis, whole
            assert sorted(mta.store.queue_ids()) == sorted(accepted)
            for qid, subject in accepted.items():
                stored = mta.store.load(qid)
                assert stored is not None and f"Subject: {subject}\r\n".encode() in stored.body
                assert stored.body.endswith(body * 50)
            assert "queue write of" in mta.logs() and "452 4.3.1" in mta.logs()

            # room again: the worker delivers every accepted message, once
            small.client().config_set("maxmemory", "0")
            mta.start_worker()
            assert wait_for(lambda: len(box.messages) >= len(accepted), GENEROUS), mta.logs()
            assert subjects(box) == sorted(accepted.values())
            assert wait_for(lambda: mta.store.queue_size() == 0, GENEROUS), mta.logs()
            # the pause after an OOM ends (a second after the last refusal): wait for it, not a guess

            def mail_accepted() -> bool:
                with Wire(mta.port, timeout=GENEROUS) as w:
                    w.greet()
                    return w.cmd("MAIL FROM:<a@client.test>").code == 250

            eventually(mail_accepted, "mail accepted again after the OOM pause", interval=0.2)
            mta.send("a@client.test", ["bob@ours.test"], "Subject: after\r\n\r\nx\r\n")
            assert wait_for(lambda: len(box.messages) == len(accepted) + 1, GENEROUS), mta.logs()
        finally:
            mta.stop_all()
