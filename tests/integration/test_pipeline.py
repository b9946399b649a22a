"""The whole path: SMTP client -> ingress -> real Redis -> worker -> DNS -> aiosmtpd MX sinks."""

from __future__ import annotations

import smtplib
from collections.abc import Callable

import pytest

from common.store import LAYOUT_KEY, msg_key
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, message
from tests.integration.eventually import GENEROUS
from tests.mailparse import parse, recipient_blocks
from tests.redisserver import RedisServer
from tests.sinks import SinkServer, wait_for

SENDER = "alice@client.test"


def test_delivery_to_three_domains_at_once(
    sender_zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    boxes = {}
    for n, d in enumerate(["a", "b", "c"], start=2):
        sender_zone.add(f"{d}.test.", "MX", f"10 mx.{d}.test.")
        sender_zone.add(f"mx.{d}.test.", "A", f"127.0.0.{n}")
        boxes[d] = sinks(f"127.0.0.{n}")
    mta = mta_factory()
    mta.start_ingress()
    mta.start_worker()
    rcpts = ["u1@a.test", "u2@b.test", "u3@c.test", "u4@a.test"]
    qid = mta.send(SENDER, rcpts, message("three"))
    assert wait_for(lambda: all(b.messages for b in boxes.values()), GENEROUS), mta.logs()
    assert sorted(boxes["a"].messages[0][1]) == ["u1@a.test", "u4@a.test"]  # one transaction per domain
    assert boxes["b"].messages[0][1] == ["u2@b.test"]
    got = parse(boxes["c"].messages[0][2])
    assert got["Subject"] == "three"
    assert qid in got["Received"] and "mtaq.test" in got["Received"]
    assert wait_for(lambda: mta.store.queue_size() == 0, GENEROUS), mta.logs()
    assert "status=sent" in mta.logs() and f"{qid}: to=<u2@b.test>, relay=mx.b.test[127.0.0.3]" in mta.logs()


def test_mx_failover_when_first_mx_is_down(
    sender_zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    sender_zone.add("a.test.", "MX", "10 mx1.a.test.")
    sender_zone.add("a.test.", "MX", "20 mx2.a.test.")
    sender_zone.add("mx1.a.test.", "A", "127.0.0.2")  # nothing listens there
    sender_zone.add("mx2.a.test.", "A", "127.0.0.3")
    backup = sinks("127.0.0.3")
    mta = mta_factory()
    mta.start_ingress()
    mta.start_worker()
    mta.send(SENDER, ["bob@a.test"], message("failover"))
    assert wait_for(lambda: backup.messages, GENEROUS), mta.logs()
    assert "Connection refused" in mta.logs() or "connect to" in mta.logs()


def test_implicit_mx(
    sender_zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    sender_zone.add("b.test.", "A", "127.0.0.4")  # no MX: the domain's own address (RFC 5321 §5.1)
    box = sinks("127.0.0.4")
    mta = mta_factory()
    mta.start_ingress()
    mta.start_worker()
    mta.send(SENDER, ["bob@b.test"], message("implicit"))
    assert wait_for(lambda: box.messages, GENEROUS), mta.logs()


@pytest.mark.parametrize(
    ("domain", "records", "status"),
    [
        ("null.test", [("MX", "0 .")], "5.1.10"),  # RFC 7505
        ("nx.test", [], "5.1.2"),  # NXDOMAIN
    ],
)
def test_unroutable_domains_bounce(
    sender_zone: ZoneServer,
    sinks: Callable[..., SinkServer],
    mta_factory: Callable[..., MTA],
    domain: str,
    records: list[tuple[str, str]],
    status: str,
) -> None:
    for rdtype, text in records:
        sender_zone.add(f"{domain}.", rdtype, text)
    home = sinks("127.0.0.9")
    mta = mta_factory()
    mta.start_ingress()
    mta.start_worker()
    qid = mta.send(SENDER, [f"bob@{domain}"], message("unroutable"))
    assert wait_for(lambda: home.messages, GENEROUS), mta.logs()
    mail_from, to, data = home.messages[0]
    assert mail_from == "" and to == [SENDER]
    [block] = recipient_blocks(data)
    assert block["final-recipient"] == f"rfc822; bob@{domain}"
    assert block["action"] == "failed" and block["status"] == status
    assert f"{qid}: to=<bob@{domain}>" in mta.logs() and "status=bounced" in mta.logs()
    assert wait_for(lambda: mta.store.queue_size() == 0, GENEROUS)


def test_550_next_to_250_one_delivered_one_dsn(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    box = sinks("127.0.0.2")
    box.rcpt_replies["bad@a.test"] = "550 5.1.1 <bad@a.test>: Recipient address rejected: User unknown"
    home = sinks("127.0.0.9")
    mta = mta_factory()
    mta.start_ingress()
    mta.start_worker()
    mta.send(SENDER, ["good@a.test", "bad@a.test"], message("mixed"))
    assert wait_for(lambda: box.messages and home.messages, GENEROUS), mta.logs()
    assert box.messages[0][1] == ["good@a.test"]
    [block] = recipient_blocks(home.messages[0][2])
    assert block["final-recipient"] == "rfc822; bad@a.test"
    assert block["status"] == "5.1.1"
    assert "User unknown" in block["diagnostic-code"] and block["remote-mta"] == "dns; mx.a.test"
    report = parse(home.messages[0][2])
    headers = next(p for p in report.walk() if p.get_content_type() == "text/rfc822-headers")
    assert "Subject: mixed" in headers.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert wait_for(lambda: mta.store.queue_size() == 0, GENEROUS)


def test_451_retries_then_bounces_after_queue_lifetime(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    box = sinks("127.0.0.2")
    box.rcpt_default = "451 4.3.0 Try again later"
    home = sinks("127.0.0.9")
    mta = mta_factory(min_backoff=1, max_backoff=1, queue_lifetime=4)
    mta.start_ingress()
    mta.start_worker()
    qid = mta.send(SENDER, ["slow@a.test"], message("later"))
    assert wait_for(lambda: home.messages, GENEROUS), mta.logs()
    assert box.attempts >= 2, mta.logs()  # tried, deferred, tried again
    [block] = recipient_blocks(home.messages[0][2])
    assert block["action"] == "failed" and block["status"].startswith("4.")
    assert "451" in block["diagnostic-code"]
    assert mta.logs().count(f"{qid}: to=<slow@a.test>") >= 3 and "status=deferred" in mta.logs()
    assert wait_for(lambda: mta.store.queue_size() == 0, GENEROUS)


def test_no_bounce_for_null_sender(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    box = sinks("127.0.0.2")
    box.rcpt_replies["bad@a.test"] = "550 5.1.1 User unknown"
    home = sinks("127.0.0.9")
    mta = mta_factory()
    mta.start_ingress()
    mta.start_worker()
    qid = mta.send("", ["bad@a.test"], message("a bounce itself"))
    assert wait_for(lambda: mta.store.queue_size() == 0, GENEROUS), mta.logs()
    assert f"{qid}: to=<bad@a.test>" in mta.logs()
    assert home.messages == []  # never a bounce of a bounce


def test_redis_down_at_data_gets_451_and_retry_works(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA], redis_server: RedisServer
) -> None:
    box = sinks("127.0.0.2")
    mta = mta_factory()
    mta.start_ingress()
    with mta.smtp() as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt("bob@a.test")[0] == 250
        redis_server.stop()
        code, resp = s.data(message("redis down"))
        assert code == 451 and resp.startswith(b"4.3.0"), (code, resp)
        assert s.noop()[0] == 250  # the session survives
    redis_server.start()
    mta.start_worker()
    mta.send(SENDER, ["bob@a.test"], message("after"))
    assert wait_for(lambda: box.messages, GENEROUS), mta.logs()
    assert [parse(m[2])["Subject"] for m in box.messages] == ["after"]  # nothing half-stored


def test_relay_denied_for_strangers(sender_zone: ZoneServer, mta_factory: Callable[..., MTA]) -> None:
    mta = mta_factory(mynetworks="10.9.9.0/24", relay_domains="ours.test")
    mta.start_ingress()
    with mta.smtp() as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        code, resp = s.rcpt("bob@elsewhere.test")
        assert (code, resp[:5]) == (554, b"5.7.1")
        assert s.rcpt("bob@ours.test")[0] == 250


def test_smtplib_sendmail_round_trip(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    box = sinks("127.0.0.2")
    mta = mta_factory()
    mta.start_ingress()
    mta.start_worker(2)
    with smtplib.SMTP("127.0.0.1", mta.port) as s:
        for i in range(20):
            assert s.sendmail(SENDER, [f"u{i}@a.test"], message(f"m{i}")) == {}
    assert wait_for(lambda: len(box.messages) == 20, GENEROUS), mta.logs()


def test_dsn_parameters_are_honoured_end_to_end(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    """RFC 3461 through the whole path: NOTIFY=NEVER -> no bounce, NOTIFY=SUCCESS -> a report,
    RET=FULL -> the whole message comes back, ENVID and ORCPT are echoed."""
    box = sinks("127.0.0.2")
    box.rcpt_replies["bad@a.test"] = "550 5.1.1 User unknown"
    box.rcpt_replies["quiet@a.test"] = "550 5.1.1 User unknown"
    home = sinks("127.0.0.9")
    mta = mta_factory()
    mta.start_ingress()
    mta.start_worker()
    with mta.smtp() as s:
        s.ehlo()
        assert s.has_extn("dsn")
        assert s.mail(SENDER, ["RET=FULL", "ENVID=env+2Bid"])[0] == 250
        assert s.rcpt("bad@a.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;Bad@A.test"])[0] == 250
        assert s.rcpt("quiet@a.test", ["NOTIFY=NEVER"])[0] == 250
        assert s.rcpt("good@a.test", ["NOTIFY=SUCCESS"])[0] == 250
        assert s.data(message("params", body="the whole body\r\n"))[0] == 250
    assert wait_for(lambda: home.messages, GENEROUS), mta.logs()
    assert wait_for(lambda: mta.store.queue_size() == 0, GENEROUS), mta.logs()
    assert len(home.messages) == 1  # one report for the message
    data = home.messages[0][2]
    blocks = {b["final-recipient"]: b for b in recipient_blocks(data)}
    assert set(blocks) == {"rfc822; bad@a.test", "rfc822; good@a.test"}  # quiet@ asked for nothing
    assert blocks["rfc822; bad@a.test"]["action"] == "failed"
    assert blocks["rfc822; bad@a.test"]["original-recipient"] == "rfc822; Bad@A.test"
    assert blocks["rfc822; good@a.test"]["action"] == "relayed"
    assert b"Original-Envelope-Id: env+id" in data or b"Original-Envelope-Id: env+2Bid" in data
    assert b"the whole body" in data  # RET=FULL


@pytest.mark.parametrize("pipelining", [True, False])
def test_batch_over_one_connection_with_and_without_pipelining(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA], pipelining: bool
) -> None:
    """Many messages, some with a refused recipient, through one job: each message gets exactly its
    own recipients, whether the remote pipelines (RFC 2920) or answers command by command."""
    box = sinks("127.0.0.2")
    box.pipelining = pipelining
    box.rcpt_replies["nobody@a.test"] = "550 5.1.1 User unknown"
    home = sinks("127.0.0.9")
    mta = mta_factory()
    mta.start_ingress()
    with mta.smtp() as s:
        for i in range(10):
            rcpts = [f"u{i}@a.test", "nobody@a.test"] if i % 3 == 0 else [f"u{i}@a.test"]
            assert s.sendmail(SENDER, rcpts, message(f"m{i}")) == {}
    mta.start_worker()  # after the mail is queued: the worker finds whole batches
    assert wait_for(lambda: len(box.messages) == 10 and len(home.messages) == 4, GENEROUS), mta.logs()
    assert sorted((parse(d)["Subject"], r) for _, r, d in box.messages) == sorted(
        (f"m{i}", [f"u{i}@a.test"]) for i in range(10)
    )
    assert all(any(o.startswith("SIZE=") for o in d.mail_options) for d in box.deliveries)  # RFC 1870
    assert wait_for(lambda: mta.store.queue_size() == 0, GENEROUS)


@pytest.mark.parametrize(("tls", "broken"), [(True, False), (False, True)])
def test_opportunistic_starttls_and_plain_text_fallback(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA], tls: bool, broken: bool
) -> None:
    """STARTTLS when the MX offers it (unverified, RFC 7435); a failed handshake does not stop the
    mail: the same host again in plain text, as Postfix's `may` level does."""
    box = sinks("127.0.0.2", tls=tls, tls_broken=broken)
    mta = mta_factory()
    mta.start_ingress()
    mta.start_worker()
    mta.send(SENDER, ["bob@a.test"], message("tls"))
    assert wait_for(lambda: box.deliveries, GENEROUS), mta.logs()
    assert box.deliveries[0].tls is tls


@pytest.mark.parametrize("eightbitmime", [False, True])
def test_8bit_mail_to_a_server_without_8bitmime_is_converted(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA], eightbitmime: bool
) -> None:
    """RFC 6152 §3: 8-bit mail never goes raw to a server that does not offer 8BITMIME; it is
    converted to 7-bit MIME (quoted-printable), as Postfix does. With 8BITMIME offered the bytes
    arrive unchanged, with BODY=8BITMIME."""
    box = sinks("127.0.0.2")
    box.eightbitmime = eightbitmime
    mta = mta_factory()
    mta.start_ingress()
    mta.start_worker()
    text = "Grüße aus Köln, ça va?\r\n"
    data = (
        f"From: <{SENDER}>\r\nTo: <bob@a.test>\r\nSubject: eight bit\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + text.encode()
    with mta.smtp() as s:
        s.ehlo()
        assert s.has_extn("8bitmime")
        assert s.mail(SENDER, ["BODY=8BITMIME"])[0] == 250
        assert s.rcpt("bob@a.test")[0] == 250
        assert s.data(data)[0] == 250
    assert wait_for(lambda: box.deliveries, GENEROUS), mta.logs()
    delivery = box.deliveries[0]
    got = delivery.data
    assert f"SIZE={len(got)}" in delivery.mail_options  # RFC 1870: the size of what was sent
    if eightbitmime:
        assert got.endswith(data)  # unchanged behind the Received header ingress puts in front
        assert "BODY=8BITMIME" in delivery.mail_options
        assert "8BITMIME to 7BIT MIME" not in mta.logs()
        return
    assert got.isascii() and "BODY=8BITMIME" not in delivery.mail_options
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.endswith(b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable")
    assert body == b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln, =C3=A7a va?\r\n"
    assert parse(got).get_content() == parse(data).get_content() == text
    assert mta.logs().count("8BITMIME to 7BIT MIME conversion") == 1


def test_new_mail_is_one_key_once_the_workers_say_they_read_it(
    sender_zone: ZoneServer, mta_factory: Callable[..., MTA]
) -> None:
    """The layout gate (common/store.py LAYOUT_KEY) on real processes: a worker registers saying it
    reads one key a message, finds no other worker, opens the gate; an ingress started after it
    writes new mail in one key."""
    sender_zone.add("d.test.", "MX", "10 mx.d.test.")
    sender_zone.add("mx.d.test.", "A", "127.0.0.9")  # nobody listens there: the message stays queued
    mta = mta_factory()
    mta.start_worker()
    assert wait_for(lambda: mta.store.redis.get(LAYOUT_KEY) == b"2", GENEROUS), mta.logs()
    mta.start_ingress()
    qid = mta.send(SENDER, ["u@d.test"], message("one key"))
    assert mta.store.redis.hget(msg_key(qid), "v") == b"2" and not mta.store.redis.exists(f"mtaq:rcpt:{qid}")
    assert "every worker reads one key a message" in mta.logs()
