"""Delivery events, the webhook and the suppression list for real (issue 19): ingress and worker
processes, a real redis-server, DNS on loopback, an aiosmtpd MX that delivers, defers and refuses,
and an HTTP receiver on loopback that is down at first."""

from __future__ import annotations

import http.server
import io
import json
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common.events import SIGNATURE_HEADER, EventType, parse_entries, signature_ok
from common.settings import Settings
from common.store import EVENTS, EVENTS_GROUP, STATS
from common.suppression import SuppressionList
from mtaq.cli import build_parser
from mtaq.ops.queueview import load_views, shape
from mtaq.suppresscmd import cmd_suppress
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, message, route
from tests.integration.eventually import GENEROUS
from tests.ports import free_port
from tests.redisserver import RedisServer
from tests.sinks import SinkServer, wait_for

SECRET = b"webhook-test-secret"
SENDER = "app@client.test"


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records every POST and whether its signature verified."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.posts: list[tuple[bytes, bool]] = []
        self.lock = threading.Lock()
        self.server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = signature_ok(SECRET, body, self.headers.get(SIGNATURE_HEADER, ""))
                with outer.lock:
                    outer.posts.append((body, ok))
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [e for body, _ in self.posts for e in json.loads(body)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(free_port(["127.0.0.1"]))
    yield rec
    rec.stop()


def _stream(r: redis.Redis) -> list[dict[str, Any]]:
    return [ev.to_json_obj() for _, ev in parse_entries(r.xrange(EVENTS))]


def _pending(r: redis.Redis) -> int:
    try:
        info: Any = r.xpending(EVENTS, EVENTS_GROUP)
    except redis.ResponseError:
        return -1  # no group yet
    return int(info["pending"])


def test_events_reach_a_webhook_that_was_down_and_a_hard_bounce_suppresses(
    dns: ZoneServer,
    sinks: Callable[..., SinkServer],
    mta_factory: Callable[..., MTA],
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    route(dns, "a.test", "127.0.0.2")
    route(dns, "client.test", "127.0.0.9")  # where the bounce report goes
    box = sinks("127.0.0.2")
    sinks("127.0.0.9")
    box.rcpt_replies["later@a.test"] = "452 4.2.2 <later@a.test>: Mailbox full, try again later"
    box.rcpt_replies["gone@a.test"] = "550 5.1.1 <gone@a.test>: Recipient address rejected: User unknown"
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    mta = mta_factory(events_webhook=f"http://127.0.0.1:{receiver.port}/hook", events_webhook_secret_file=str(secret))
    mta.start_ingress()
    mta.start_worker()
    qid = mta.send(SENDER, ["ok@a.test", "later@a.test", "gone@a.test"], message("events", sender=SENDER))

    # delivered, deferred, bounced (its report delivered too): all in the stream while the receiver is down
    def kinds() -> set[str]:
        return {e["type"] for e in _stream(mta.redis)}

    assert wait_for(lambda: {"delivery", "transient", "bounce"} <= kinds(), GENEROUS), mta.logs()
    assert wait_for(lambda: mta.store.queue_size() == 1, GENEROUS), mta.logs()  # only the deferred one left
    assert receiver.posts == []
    assert wait_for(lambda: "webhook" in mta.logs() and "unreachable" in mta.logs(), GENEROUS), mta.logs()
    receiver.start()
    # every event arrives once the receiver is up (backoff: up to a few seconds), then none is pending
    assert wait_for(lambda: len(receiver.events()) >= len(_stream(mta.redis)) and _pending(mta.redis) == 0, 30), (
        mta.logs()
    )
    posted = receiver.events()
    assert all(ok for _, ok in receiver.posts)
    ids = [e["id"] for e in posted]
    assert len(ids) == len(set(ids))  # a clean run sends no event twice
    assert posted == _stream(mta.redis)  # what was POSTed is the stream, in its order
    mine = {e["recipient"]: e for e in posted if e["queue_id"] == qid and e["type"] != "reception"}
    assert mine["ok@a.test"]["type"] == "delivery" and mine["ok@a.test"]["message_id"] == "<events@client.test>"
    assert mine["later@a.test"]["type"] == "transient" and mine["later@a.test"]["classification"] == "MailboxFull"
    assert mine["gone@a.test"]["type"] == "bounce" and mine["gone@a.test"]["classification"] == "InvalidRecipient"
    assert mine["gone@a.test"]["attempt"] == 1 and mine["gone@a.test"]["relay"].startswith("mx.a.test[127.0.0.2]")
    receptions = [e for e in posted if e["type"] == "reception" and e["queue_id"] == qid]
    assert sorted(e["recipient"] for e in receptions) == ["gone@a.test", "later@a.test", "ok@a.test"]
    assert "dsn=5.1.1, class=InvalidRecipient, status=bounced" in mta.logs()
    # the class as a metric and beside the queue's deferral reasons
    assert wait_for(lambda: mta.redis.hget(STATS, "failed:bounced:InvalidRecipient") == b"1", GENEROUS)
    assert mta.redis.hget(STATS, "failed:deferred:MailboxFull") == b"1"
    views = list(load_views(mta.redis, ""))
    sh = shape(views, time.time())
    assert set(sh.reason_class.values()) == {"MailboxFull"}
    # the attempt's TLS (issue 21), as recorded for the recipient: this sink offers no STARTTLS
    kept = {r.address: r.status for v in views for r in v.recipients}
    assert mine["later@a.test"]["tls"] == kept["later@a.test"].tls == "none"
    assert mine["ok@a.test"]["tls"] == "none" and "tls=none, dsn=5.1.1, class=InvalidRecipient" in mta.logs()

    # the hard bounce suppressed gone@a.test: refused at RCPT (within the ingress's refresh), others kept
    entry = SuppressionList(mta.redis).lookup("gone@a.test")
    assert entry is not None
    with mta.smtp() as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        assert wait_for(lambda: s.rcpt("gone@a.test")[0] == 550, 5)
        code, text = s.rcpt("GONE@a.test")
        assert (code, text.decode()) == (
            550,
            f"5.1.1 <GONE@a.test>: recipient suppressed after a hard bounce on {_day(entry.since)}",
        )
        assert s.rcpt("ok@a.test")[0] == 250
        code, _ = s.data(message("after", sender=SENDER))
        assert code == 250
    assert wait_for(lambda: any(e["type"] == "suppressed" for e in receiver.events()), 30), mta.logs()
    refused = [e for e in _stream(mta.redis) if e["type"] == EventType.SUPPRESSED.value]
    assert refused and all(e["recipient"].lower() == "gone@a.test" and e["dsn"] == "5.1.1" for e in refused)
    assert wait_for(lambda: box.recipients().count("ok@a.test") == 2, GENEROUS), mta.logs()


def _day(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d")


def test_suppress_command_round_trip(redis_server: RedisServer, tmp_path: Path) -> None:
    def run(*argv: str) -> tuple[int, str, str]:
        args = build_parser().parse_args(["suppress", "--redis-url", redis_server.url, *argv])
        out, err = io.StringIO(), io.StringIO()
        code = cmd_suppress(Settings.from_args(args, env={}), args, out, err)
        return code, out.getvalue(), err.getvalue()

    assert run("add", "Bob@Example.test")[0] == 0
    assert run("add", "not-an-address")[0] == 2
    f = tmp_path / "list"
    f.write_text("# from the old system\na@x.test\n\nb@x.test  \n")
    code, out, _ = run("import", str(f), "--ttl", "60")
    assert code == 0 and out.startswith("2 address(es)")
    code, out, _ = run("list", "--json")
    rows = json.loads(out)
    assert [r["address"] for r in rows] == ["a@x.test", "b@x.test", "bob@example.test"]
    assert run("export")[1].split() == ["a@x.test", "b@x.test", "bob@example.test"]
    assert run("remove", "a@x.test")[0] == 0
    code, _, err = run("remove", "a@x.test")
    assert code == 1 and "not on the list" in err
    bad = tmp_path / "bad"
    bad.write_text("ok@x.test\nno address here\n")
    code, _, err = run("import", str(bad))
    assert code == 2 and f"{bad}:2" in err and err[-1] == "\n" and err.count("\n") == 1
    assert run("export")[1].split() == ["b@x.test", "bob@example.test"]
    # an export is an import's input
    exported = tmp_path / "exported"
    exported.write_text(run("export")[1])
    assert run("import", str(exported))[0] == 0
    # Redis unreachable: one line, exit 3
    args = build_parser().parse_args(["suppress", "--redis-url", "redis://127.0.0.1:1", "list"])
    err_io = io.StringIO()
    assert cmd_suppress(Settings.from_args(args, env={}), args, io.StringIO(), err_io) == 3
    assert err_io.getvalue().count("\n") == 1


def test_smtplib_sees_the_refusal_as_a_recipient_error_only(
    dns: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    """sendmail() with a suppressed and a valid recipient: the message goes to the valid one."""
    route(dns, "a.test", "127.0.0.2")
    box = sinks("127.0.0.2")
    mta = mta_factory()
    SuppressionList(mta.redis).add(["blocked@a.test"], 3600)
    mta.start_ingress()
    mta.start_worker()
    with mta.smtp() as s:
        refused = s.sendmail(SENDER, ["blocked@a.test", "fine@a.test"], message("partial", sender=SENDER))
    assert list(refused) == ["blocked@a.test"] and refused["blocked@a.test"][0] == 550
    assert wait_for(lambda: box.recipients() == ["fine@a.test"], GENEROUS), mta.logs()
    with pytest.raises(smtplib.SMTPRecipientsRefused), mta.smtp() as s:
        s.sendmail(SENDER, ["blocked@a.test"], message("none", sender=SENDER))
