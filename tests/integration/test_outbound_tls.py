"""Outbound TLS an attacker cannot strip (issue 21), end to end: ingress and worker processes, a real
redis-server, the DNS test zone (AD for "signed" names), an HTTPS policy server with a test CA on
127.0.21.x:443, aiosmtpd MX sinks with and without STARTTLS, with good and rogue certificates."""

from __future__ import annotations

import email
import email.policy
import gzip
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from common.envelope import RcptState, RecipientStatus
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, ROOT, message
from tests.integration.eventually import eventually
from tests.integration.smtpwire import make_tls_files
from tests.policyserver import PolicyServer, serving
from tests.sinks import SinkServer
from worker.tlspolicy import spki

WEB = "127.0.21.2"


def policy(mode: str, *mx: str) -> bytes:
    return ("version: STSv1\n" + f"mode: {mode}\n" + "".join(f"mx: {m}\n" for m in mx) + "max_age: 86400\n").encode()


@pytest.fixture
def ca() -> trustme.CA:
    """The test's "public" CA: tls_ca_file holds it, good MX and the policy server have its certificates."""
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


POLICIES = {
    "good.test": policy("enforce", "mx.good.test"),
    "rogue.test": policy("enforce", "mx.rogue.test"),
    "plain.test": policy("enforce", "mx.plain.test"),
    "notin.test": policy("enforce", "*.elsewhere.test"),
    "testing.test": policy("testing", "mx.testing.test"),
}


@pytest.fixture
def web(ca: trustme.CA) -> Iterator[PolicyServer]:
    with serving(WEB, ca, dict(POLICIES)) as server:
        yield server


def mx(zone: ZoneServer, domain: str, ip: str, *, sts_id: str = "") -> None:
    zone.add(f"{domain}.", "MX", f"10 mx.{domain}.")
    zone.add(f"mx.{domain}.", "A", ip)
    if sts_id:
        zone.add(f"_mta-sts.{domain}.", "TXT", f'"v=STSv1; id={sts_id}"')
        zone.add(f"mta-sts.{domain}.", "A", WEB)


def attempt(mta: MTA, qid: str) -> str:
    """The worker's log line for the first delivery attempt of ``qid`` (one recipient)."""
    found: list[str] = []

    def seen() -> bool:
        found[:] = [line for line in mta.logs().splitlines() if f"{qid}: to=<" in line]
        return bool(found)

    try:
        eventually(seen, f"a delivery attempt of {qid}")
    except AssertionError:
        raise AssertionError(mta.logs()[-6000:]) from None
    return found[0]


def deferred(mta: MTA, qid: str) -> RecipientStatus:
    attempt(mta, qid)  # logged just before it is written
    eventually(lambda: mta.store.statuses(qid)[0].state is RcptState.DEFERRED, f"{qid} deferred")
    return mta.store.statuses(qid)[0]


def send(mta: MTA, to: str) -> str:
    return mta.send("alice@client.test", [to], message(to=to))


def test_mta_sts_enforce_and_testing(
    mta_factory: Callable[..., MTA],
    dns: ZoneServer,
    web: PolicyServer,
    sinks: Callable[..., SinkServer],
    ca: trustme.CA,
    ca_file: str,
) -> None:
    good = sinks("127.0.0.2", tls=True, ca=ca, hostname="mx.good.test")
    rogue = sinks("127.0.0.3", tls=True, hostname="mx.rogue.test")  # its own CA: an impostor
    plain = sinks("127.0.0.4")  # no STARTTLS: stripped
    notin = sinks("127.0.0.5", tls=True, ca=ca, hostname="mx.notin.test")
    testing = sinks("127.0.0.6", tls=True, hostname="mx.testing.test")
    for domain, sink in [("good", good), ("rogue", rogue), ("plain", plain), ("notin", notin), ("testing", testing)]:
        mx(dns, f"{domain}.test", sink.host, sts_id="1")
    mta = mta_factory(tls_ca_file=ca_file, min_backoff=3600, max_backoff=3600)
    mta.start_ingress()
    mta.start_worker()
    asked = notin.connections  # aiosmtpd's own readiness probe
    qids = {d: send(mta, f"bob@{d}.test") for d in ("good", "rogue", "plain", "notin", "testing")}

    line = attempt(mta, qids["good"])
    assert "status=sent" in line and "tls=verified(mta-sts) TLSv1." in line, line
    assert [d.tls for d in good.deliveries] == [True]

    for d, result_dsn, words in [
        ("rogue", "4.7.5", "not trusted"),
        ("plain", "4.7.4", "no STARTTLS"),
        ("notin", "4.7.5", "mx.notin.test is not in the policy"),
    ]:
        st = deferred(mta, qids[d])
        assert st.dsn == result_dsn and f"MTA-STS policy of {d}.test" in st.reply and words in st.reply, (d, st)
    assert rogue.deliveries == [] and plain.deliveries == [] and notin.deliveries == []
    assert notin.connections == asked  # not in the policy: not even asked

    # TLS-Required: No (RFC 8689 §4.2.1): the sender lets this one go despite the policy failure
    body = b"TLS-Required: No\r\n" + message(subject="relaxed", to="carol@rogue.test")
    line = attempt(mta, mta.send("alice@client.test", ["carol@rogue.test"], body))
    assert "status=sent" in line and "tls=opportunistic" in line, line
    assert [d.rcpt_tos for d in rogue.deliveries] == [["carol@rogue.test"]]

    line = attempt(mta, qids["testing"])
    assert "status=sent" in line and "tls=opportunistic TLSv1." in line, line
    assert [d.tls for d in testing.deliveries] == [True]
    log = mta.logs()
    assert "MTA-STS policy of testing.test (testing)" in log
    assert "MTA-STS policy of rogue.test: certificate of mx.rogue.test not trusted" in log
    # Prometheus counters by TLS level and outcome (written to Redis within a second)
    stats = "mtaq:stats"
    eventually(lambda: mta.redis.hget(stats, "tls:verified(mta-sts):sent") == b"1", "the verified delivery counted")
    eventually(lambda: mta.redis.hget(stats, "tls:none:deferred") == b"3", "the three policy deferrals counted")
    eventually(lambda: mta.redis.hget(stats, "tls:opportunistic:sent") == b"2", "testing mode, TLS-Required: No")


def test_cached_policy_survives_the_policy_server_going_away(
    mta_factory: Callable[..., MTA],
    dns: ZoneServer,
    web: PolicyServer,
    sinks: Callable[..., SinkServer],
    ca: trustme.CA,
    ca_file: str,
) -> None:
    rogue = sinks("127.0.0.3", tls=True, hostname="mx.rogue.test")
    mx(dns, "rogue.test", rogue.host, sts_id="1")
    mta = mta_factory(tls_ca_file=ca_file, min_backoff=3600, max_backoff=3600)
    mta.start_ingress()
    mta.start_worker()
    first = deferred(mta, send(mta, "bob@rogue.test"))
    assert "MTA-STS policy of rogue.test" in first.reply
    assert mta.redis.exists("mtaq:mta-sts:rogue.test")
    # the attacker takes the policy server down and strips the TXT record; a fresh worker (no
    # memory of its own) still finds the policy in Redis and still refuses the impostor
    web.stop()
    dns.remove("_mta-sts.rogue.test.")
    mta.stop("worker0")
    mta.start_worker()
    qid = send(mta, "carol@rogue.test")
    second = deferred(mta, qid)
    assert "MTA-STS policy of rogue.test" in second.reply, second
    assert rogue.deliveries == []
    # what the operator sees for the last attempt
    shown = subprocess.run(
        [sys.executable, "-m", "mtaq", "queue", "show", qid],
        env=mta.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "tls=none, dsn=4.7.5" in shown.stdout and "MTA-STS policy of rogue.test" in shown.stdout, shown

    # TLS-RPT: the day's counts go, gzipped JSON through our own queue, to the domain's rua address
    dns.add("_smtp._tls.rogue.test.", "TXT", '"v=TLSRPTv1; rua=mailto:tlsrpt@client.test"')
    home = sinks("127.0.0.9")
    mx(dns, "client.test", home.host)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    done = subprocess.run(
        [sys.executable, "-m", "mtaq", "tlsrpt", "send", "--date", today],
        env=mta.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and f"{today} rogue.test: mailto:tlsrpt@client.test" in done.stdout, done
    eventually(lambda: len(home.deliveries) == 1, "the TLS-RPT report at the domain's address")
    report = email.message_from_bytes(home.deliveries[0].data, policy=email.policy.default)
    part = next(p for p in report.walk() if p.get_content_type() == "application/tlsrpt+gzip")
    data = json.loads(gzip.decompress(part.get_payload(decode=True)))  # type: ignore[arg-type]
    (entry,) = data["policies"]
    assert entry["policy"]["policy-type"] == "sts" and "mode: enforce" in entry["policy"]["policy-string"]
    assert entry["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 2}
    assert entry["failure-details"][0]["result-type"] == "certificate-not-trusted"


def dane_mx(zone: ZoneServer, domain: str, sink: SinkServer, tlsa: str | None, port: int) -> None:
    mx(zone, domain, sink.host)
    if tlsa is not None:
        zone.add(f"_{port}._tcp.mx.{domain}.", "TLSA", tlsa)


def test_dane(
    mta_factory: Callable[..., MTA],
    dns: ZoneServer,
    sinks: Callable[..., SinkServer],
    mx_port: int,
) -> None:
    good = sinks("127.0.0.2", tls=True, hostname="mx.dgood.test")
    wrong = sinks("127.0.0.3", tls=True, hostname="mx.dwrong.test")
    plain = sinks("127.0.0.4")
    unsigned = sinks("127.0.0.5", tls=True, hostname="mx.unsigned.test")
    broken = sinks("127.0.0.6", tls=True, hostname="mx.dfail.test")
    other = x509.load_pem_x509_certificate(trustme.CA().cert_pem.bytes())
    bogus = f"3 1 1 {hashlib.sha256(spki(other)).hexdigest()}"
    dane_mx(dns, "dgood.test", good, leaf_tlsa(good), mx_port)
    dane_mx(dns, "dwrong.test", wrong, bogus, mx_port)
    dane_mx(dns, "dplain.test", plain, bogus, mx_port)
    dane_mx(dns, "unsigned.test", unsigned, bogus, mx_port)  # a TLSA answer without AD: ignored
    dane_mx(dns, "dfail.test", broken, None, mx_port)
    dns.servfail.add(f"_{mx_port}._tcp.mx.dfail.test/TLSA")  # a signed host whose TLSA lookup fails
    dns.signed.update({"dgood.test.", "dwrong.test.", "dplain.test.", "dfail.test."})
    mta = mta_factory(dane="yes", min_backoff=3600, max_backoff=3600)
    mta.start_ingress()
    mta.start_worker()
    qids = {d: send(mta, f"bob@{d}.test") for d in ("dgood", "dwrong", "dplain", "unsigned", "dfail")}
    line = attempt(mta, qids["dgood"])
    assert "status=sent" in line and "tls=verified(dane) TLSv1." in line, line
    assert [d.tls for d in good.deliveries] == [True]
    for d, words in [
        ("dwrong", "no TLSA record of mx.dwrong.test matches"),
        ("dplain", "no STARTTLS"),
        ("dfail", "TLSA lookup for _"),
    ]:
        st = deferred(mta, qids[d])
        assert f"DANE policy of {d}.test" in st.reply and words in st.reply, st
    assert wrong.deliveries == [] and plain.deliveries == [] and broken.deliveries == []
    line = attempt(mta, qids["unsigned"])
    assert "status=sent" in line and "tls=opportunistic" in line, line


def leaf_tlsa(sink: SinkServer) -> str:
    """DANE-EE(3) SPKI(1) SHA2-256(1) of the certificate ``sink`` presents."""
    assert sink.leaf is not None
    leaf = x509.load_pem_x509_certificate(sink.leaf.cert_chain_pems[0].bytes())
    return f"3 1 1 {hashlib.sha256(spki(leaf)).hexdigest()}"


def test_requiretls_delivered_via_dane_and_bounced_without_a_verified_policy(
    mta_factory: Callable[..., MTA],
    dns: ZoneServer,
    sinks: Callable[..., SinkServer],
    mx_port: int,
    tmp_path: Path,
) -> None:
    signed = sinks("127.0.0.2", tls=True, hostname="mx.rsigned.test")
    signed.requiretls = True
    loose = sinks("127.0.0.3", tls=True, hostname="mx.rloose.test")  # TLS, but nothing verifies it
    loose.requiretls = True
    home = sinks("127.0.0.9")  # the sender's domain: where the bounce goes
    dane_mx(dns, "rsigned.test", signed, leaf_tlsa(signed), mx_port)
    dns.signed.add("rsigned.test.")
    mx(dns, "rloose.test", loose.host)
    mx(dns, "client.test", home.host)
    files = tmp_path / "ingress-tls"
    files.mkdir()
    tls = make_tls_files(files)
    mta = mta_factory(dane="yes", tls_cert=tls.cert, tls_key=tls.key, min_backoff=3600, max_backoff=3600)
    mta.start_ingress()
    mta.start_worker()

    def send_requiretls(to: str) -> str:
        with mta.smtp() as s:
            s.ehlo()
            s.starttls(context=tls.client_context())
            s.ehlo()
            assert s.has_extn("requiretls")
            code, resp = s.mail("alice@client.test", ["REQUIRETLS"])
            assert code == 250, resp
            assert s.rcpt(to)[0] == 250
            code, resp = s.data(message(to=to))
            assert code == 250, resp
            return resp.decode().rsplit(" ", 1)[-1]

    line = attempt(mta, send_requiretls("bob@rsigned.test"))
    assert "status=sent" in line and "tls=verified(dane)" in line, line
    assert signed.requiretls_mails == 1 and len(signed.deliveries) == 1

    # two MX hosts: the first is not verified (no TLSA), the second is: REQUIRETLS goes to the second
    dns.add("rmixed.test.", "MX", "10 mx1.rmixed.test.")
    dns.add("rmixed.test.", "MX", "20 mx2.rmixed.test.")
    dns.add("mx1.rmixed.test.", "A", loose.host)
    dns.add("mx2.rmixed.test.", "A", signed.host)
    dns.add(f"_{mx_port}._tcp.mx2.rmixed.test.", "TLSA", leaf_tlsa(signed))
    dns.signed.add("rmixed.test.")
    line = attempt(mta, send_requiretls("carol@rmixed.test"))
    assert "status=sent" in line and "relay=mx2.rmixed.test" in line and "tls=verified(dane)" in line, line
    assert signed.requiretls_mails == 2 and loose.deliveries == []

    line = attempt(mta, send_requiretls("bob@rloose.test"))
    assert "status=bounced" in line and "dsn=5.7.30" in line and "not verified by DANE or MTA-STS" in line, line
    assert loose.deliveries == [] and loose.requiretls_mails == 0
    eventually(lambda: len(home.deliveries) == 1, "the bounce at the sender's domain")
    assert b"5.7.30" in home.deliveries[0].data and home.deliveries[0].mail_from == ""
