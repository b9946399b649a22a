"""Delay warnings and bounce_lifetime end to end: ingress and worker processes, a real Redis, DNS on
loopback, aiosmtpd sinks as the remote MX and as the sender's own MX (where reports arrive)."""

from __future__ import annotations

from collections.abc import Callable

from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, message
from tests.integration.eventually import GENEROUS
from tests.mailparse import parse, recipient_blocks
from tests.sinks import SinkServer, wait_for

SENDER = "alice@client.test"


def actions(data: bytes) -> list[str]:
    """The Action of each recipient block of an RFC 3464 report."""
    return [b["action"] for b in recipient_blocks(data)]


def running(mta_factory: Callable[..., MTA], **settings: object) -> MTA:
    mta = mta_factory(**settings)
    mta.start_ingress()
    mta.start_worker()
    return mta


def refusing(sinks: Callable[..., SinkServer], reply: str, **kw: object) -> tuple[SinkServer, SinkServer]:
    """The remote MX (every recipient gets ``reply``) and the sender's own MX, where reports land."""
    box = sinks("127.0.0.2", **kw)
    box.rcpt_default = reply
    return box, sinks("127.0.0.9", **kw)


def test_a_recipient_deferred_past_delay_warning_gets_exactly_one_delayed_dsn(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    _, home = refusing(sinks, "451 4.3.0 Try again later")
    # retried every second; warned at the first deferral 2 s after arrival; gives up at 8 s, so
    # several deferrals come after the warning, each a chance to send a second one
    mta = running(mta_factory, min_backoff=1, max_backoff=1, queue_lifetime=8, delay_warning=2)
    qid = mta.send(SENDER, ["slow@a.test"], message("slow"))
    assert wait_for(lambda: any("failed" in actions(m[2]) for m in home.messages), 60), mta.logs()
    reports = [(m[0], m[1], actions(m[2]), parse(m[2])) for m in home.messages]
    delayed = [r for r in reports if r[2] == ["delayed"]]
    assert len(delayed) == 1, mta.logs()
    sender, rcpts, _, report = delayed[0]
    assert sender == "" and rcpts == [SENDER]
    assert report["Subject"] == "Delayed Mail (still being retried)"
    assert [r[2] for r in reports].count(["failed"]) == 1 and len(reports) == 2
    logs = mta.logs()
    warned_at = logs.index(f"{qid}: sender delay notification:")
    assert f"{qid}: to=<slow@a.test>" in logs[warned_at:] and "status=deferred" in logs[warned_at:], logs
    assert wait_for(lambda: mta.store.queue_size() == 0, GENEROUS)


def test_a_bounce_gives_up_at_bounce_lifetime_while_other_mail_waits(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    _, home = refusing(sinks, "451 4.3.0 Try again later")
    mta = running(mta_factory, min_backoff=1, max_backoff=1, queue_lifetime=600, bounce_lifetime=3)
    bounce = mta.send("", ["slow@a.test"], message("a bounce"))
    ordinary = mta.send(SENDER, ["slow2@a.test"], message("ordinary"))
    assert wait_for(lambda: mta.store.load(bounce) is None, 60), mta.logs()
    assert mta.store.load(ordinary) is not None  # queue_lifetime (600 s) still holds it
    logs = mta.logs()
    assert f"{bounce}: to=<slow@a.test>" in logs and "gave up after" in logs, logs
    assert home.messages == []  # nobody to tell about a bounce that could not be delivered


def test_mail_from_outside_gets_only_headers_back_and_is_told_why(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    """An inbound relay: the client is neither in mynetworks nor authenticated, so a bounce to the
    sender it claimed must not carry the content (backscatter), whatever RET says."""
    _, home = refusing(sinks, "550 5.1.1 User unknown")
    mta = running(mta_factory, mynetworks="10.9.9.0/24", relay_domains="a.test")
    with mta.smtp() as s:
        s.ehlo()
        assert s.mail(SENDER, ["RET=FULL"])[0] == 250
        assert s.rcpt("bad@a.test")[0] == 250
        assert s.data(message("outside", body="SECRET-CONTENT\r\n"))[0] == 250
    assert wait_for(lambda: home.messages, GENEROUS), mta.logs()
    data = home.messages[0][2]
    assert actions(data) == ["failed"] and b"SECRET-CONTENT" not in data
    report = parse(data)
    kinds = [p.get_content_type() for p in report.iter_parts()]
    assert kinds == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    text = " ".join(next(iter(report.iter_parts())).get_content().split())
    assert "only its headers are attached" in text


def test_eight_bit_mail_with_ret_full_comes_back_whole_over_8bitmime(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    _, home = refusing(sinks, "550 5.1.1 User unknown")
    mta = running(mta_factory)
    body = "From: <alice@client.test>\r\nSubject: café\r\nMIME-Version: 1.0\r\n"
    body += "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nsmörgåsbord\r\n"
    with mta.smtp() as s:
        s.ehlo()
        assert s.mail(SENDER, ["RET=FULL", "BODY=8BITMIME"])[0] == 250
        assert s.rcpt("bad@a.test")[0] == 250
        assert s.data(body.encode())[0] == 250
    assert wait_for(lambda: home.deliveries, GENEROUS), mta.logs()
    delivery = home.deliveries[0]
    assert "BODY=8BITMIME" in delivery.mail_options  # the report is 8-bit and says so
    report = parse(delivery.data)
    original = list(report.iter_parts())[2]
    assert original.get_content_type() == "message/rfc822" and original["Content-Transfer-Encoding"] == "8bit"
    assert "smörgåsbord".encode() in delivery.data


def test_smtputf8_bounce_is_an_internationalized_report_in_one_escaping(
    zone: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    _, home = refusing(sinks, "550 5.1.1 <rejectjörg@a.test>: User unknown", smtputf8=True)
    mta = running(mta_factory)
    body = "From: <jörg@client.test>\r\nTo: <rejectjörg@a.test>\r\nSubject: grüße\r\n\r\nhallo\r\n"
    with mta.smtp() as s:
        s.ehlo()
        assert s.mail("jörg@client.test", ["SMTPUTF8", "RET=FULL"])[0] == 250
        assert s.rcpt("rejectjörg@a.test")[0] == 250
        assert s.data(body.encode())[0] == 250
    assert wait_for(lambda: home.deliveries, GENEROUS), mta.logs()
    delivery = home.deliveries[0]
    assert delivery.rcpt_tos == ["jörg@client.test"] and "SMTPUTF8" in delivery.mail_options
    report = parse(delivery.data)
    assert report.get_param("report-type") == "global-delivery-status"
    kinds = [p.get_content_type() for p in report.iter_parts()]
    assert kinds == ["text/plain", "message/global-delivery-status", "message/global"]
    status = delivery.data.decode("utf-8").split("message/global-delivery-status", 1)[1]
    assert "Final-Recipient: utf-8; rejectjörg@a.test" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 <rejectjörg@a.test>: User unknown" in status
    assert "\\x" not in delivery.data.decode("utf-8")  # neither \x{F6} nor \xf6 beside the UTF-8
