"""Smarthost login and routes end to end: a worker delivering to an aiosmtpd sink that offers
STARTTLS (a trustme certificate for the relayhost's name) and AUTH after it, DNS on loopback, a real
Redis; transport_table routes to sinks of their own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from common.envelope import RcptState
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, ROOT, message, route
from tests.integration.eventually import GENEROUS
from tests.sinks import SinkServer, wait_for

RELAY_NAME = "smtp.relay.test"


@pytest.fixture
def relay(dns: ZoneServer, sinks: Callable[..., SinkServer]) -> SinkServer:
    dns.add(f"{RELAY_NAME}.", "A", "127.0.0.3")
    box = sinks("127.0.0.3", tls=True, hostname=RELAY_NAME)
    box.stop()  # AUTH is set before the server starts
    box.auth = {"app": "right horse battery"}
    return box.start()


def smarthost_mta(
    mta_factory: Callable[..., MTA], relay: SinkServer, tmp_path: Path, password: str, *, trust: bool = True
) -> MTA:
    auth = tmp_path / "relay-auth"
    auth.write_text(f"# the relayhost's login\napp:{password}\n")
    ca = tmp_path / "ca.pem"
    assert relay.ca is not None
    relay.ca.cert_pem.write_to_path(str(ca))
    mta = mta_factory(
        relayhost=f"[{RELAY_NAME}]:{relay.port}",
        relayhost_auth_file=str(auth),
        tls_ca_file=str(ca) if trust else "",
        min_backoff=60,
        max_backoff=60,
    )
    mta.start_ingress()
    mta.start_worker()
    return mta


def deferred(mta: MTA, qid: str) -> str | None:
    """The deferral reply of the message's recipient once it is deferred, else None."""
    loaded = mta.store.load(qid)
    if loaded is None:
        return None
    status = mta.store.statuses(qid).get(0)
    return status.reply if status is not None and status.state is RcptState.DEFERRED else None


def test_right_password_delivered_over_verified_tls(
    relay: SinkServer, mta_factory: Callable[..., MTA], tmp_path: Path
) -> None:
    mta = smarthost_mta(mta_factory, relay, tmp_path, "right horse battery")
    mta.send("alice@client.test", ["bob@a.test"], message("via the smarthost"))
    assert wait_for(lambda: relay.messages, GENEROUS), mta.logs()
    assert relay.logins == [("app", True)] and relay.deliveries[0].tls
    assert "right horse" not in mta.logs()
    # the relayhost's certificate was checked for its name: the delivery line says so
    assert wait_for(lambda: "status=sent" in mta.logs(), GENEROUS), mta.logs()
    sent = next(line for line in mta.logs().splitlines() if "status=sent" in line)
    assert "tls=verified(pkix) TLSv1." in sent, sent


def test_wrong_password_deferred_and_logged_once(
    relay: SinkServer, mta_factory: Callable[..., MTA], tmp_path: Path
) -> None:
    mta = smarthost_mta(mta_factory, relay, tmp_path, "wrong horse")
    qids = [mta.send("alice@client.test", [f"bob{i}@a.test"], message(f"m{i}")) for i in range(3)]
    assert wait_for(lambda: all(deferred(mta, q) for q in qids), GENEROUS), mta.logs()
    reply = deferred(mta, qids[0])
    assert reply is not None and "SASL authentication failed" in reply and "535" in reply
    assert relay.messages == [] and relay.logins and not any(ok for _, ok in relay.logins)
    logs = mta.logs()
    assert logs.count("check relayhost_auth_file") == 1, logs  # once per destination, not per message
    assert "wrong horse" not in logs


def test_certificate_not_valid_no_auth_sent_deferred(
    relay: SinkServer, mta_factory: Callable[..., MTA], tmp_path: Path
) -> None:
    mta = smarthost_mta(mta_factory, relay, tmp_path, "right horse battery", trust=False)
    qid = mta.send("alice@client.test", ["bob@a.test"], message("not to an impostor"))
    assert wait_for(lambda: deferred(mta, qid), GENEROUS), mta.logs()
    reply = deferred(mta, qid)
    assert reply is not None and "certificate verify failed" in reply and "credentials not sent" in reply
    assert relay.logins == [] and relay.messages == []


def test_routes_from_the_transport_table(
    dns: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA], tmp_path: Path
) -> None:
    literal, via_mx, plain = sinks("127.0.0.4"), sinks("127.0.0.5"), sinks("127.0.0.2")
    route(dns, "relay-mx.test", "127.0.0.5")
    route(dns, "a.test", "127.0.0.2")
    table = tmp_path / "transport"
    table.write_text(f"routed.test [127.0.0.4]:{literal.port}\n.corp.test relay-mx.test\n")
    mta = mta_factory(transport_table=str(table))
    mta.start_ingress()
    mta.start_worker()
    mta.send("alice@client.test", ["a@routed.test", "b@x.corp.test", "c@a.test"], message("routes"))
    assert wait_for(lambda: literal.messages and via_mx.messages and plain.messages, GENEROUS), mta.logs()
    assert literal.recipients() == ["a@routed.test"]
    assert via_mx.recipients() == ["b@x.corp.test"]
    assert plain.recipients() == ["c@a.test"]


@pytest.mark.parametrize(
    ("setting", "content", "line"),
    [
        ("transport_table", "example.com\n", "transport_table {path} line 1: expected DOMAIN NEXTHOP"),
        (
            "relayhost_auth_file",
            "justauser\n",
            "relayhost_auth_file {path}: expected `username password` or `username:password`",
        ),
    ],
)
def test_a_bad_route_or_login_file_at_start_up_is_one_line_and_exit_78(
    tmp_path: Path, mta_factory: Callable[..., MTA], setting: str, content: str, line: str
) -> None:
    path = tmp_path / setting
    path.write_text(content)
    mta = mta_factory(relayhost="[smtp.relay.test]:587")
    env = {**mta.env, f"MTAQ_{setting.upper()}": str(path)}
    p = subprocess.run(
        [sys.executable, "-m", "mtaq", "worker"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 78, p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("mtaq: ")] == [f"mtaq: {line.format(path=path)}"]
    assert "Traceback" not in p.stderr and "justauser" not in p.stderr


def test_queue_flush_follows_the_routes(
    sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA], tmp_path: Path
) -> None:
    literal = sinks("127.0.0.4")
    table = tmp_path / "transport"
    table.write_text(f"routed.test [127.0.0.4]:{literal.port}\n")
    mta = mta_factory(transport_table=str(table))
    mta.start_ingress()  # no worker yet: the jobs wait in the queue
    mta.send("alice@client.test", ["a@routed.test"], message("flushed"))
    p = subprocess.run(
        [sys.executable, "-m", "mtaq", "queue", "flush"], env=mta.env, cwd=ROOT, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    jobs = mta.queue.rq.get_jobs()
    assert len(jobs) == 2
    destinations = {job.args[0] for job in jobs}
    assert destinations == {f"[127.0.0.4]:{literal.port}"}  # the commit's job and the flush's alike
    mta.start_worker()
    assert wait_for(lambda: literal.messages, GENEROUS), mta.logs()
