"""DKIM end to end: `mtaq dkim keygen` records published in a loopback DNS zone, `mtaq dkim check`
against it, an ingress and a worker signing, aiosmtpd sinks receiving, and two verifiers we did not
write (dkimpy; Perl's Mail::DKIM, see tests/maildkim.py) judging what arrived."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy
import dns.exception
import pytest

from common.mx import make_resolver
from tests.dnsserver import ZoneServer
from tests.fixtures import MTA, ROOT, route
from tests.integration.eventually import GENEROUS
from tests.maildkim import maildkim_verdicts, require_maildkim
from tests.sinks import SinkServer, wait_for

SENDER = "alice@news.client.test"  # signed by client.test's keys: the nearest parent with keys


@dataclass
class Keys:
    table: Path
    records: dict[str, str]  # name -> the TXT record's text as keygen printed it


def mtaq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtaq", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def keygen(folder: Path, domain: str, selector: str, algorithm: str) -> tuple[str, str, str]:
    """(table line, record name, record text) from `mtaq dkim keygen`."""
    key = folder / f"{selector}.{domain}.pem"
    p = mtaq("dkim", "keygen", domain, selector, "--algorithm", algorithm, "--key-file", str(key))
    assert p.returncode == 0, p.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    record = next(line for line in p.stdout.splitlines() if " IN TXT " in line)
    name, _, text = record.partition(" IN TXT ")
    assert all(len(s) <= 255 for s in text.strip('"').split('" "'))
    return f"{domain} {selector} {key.name}", name, text


@pytest.fixture
def keys(tmp_path: Path, dns: ZoneServer) -> Keys:
    folder = tmp_path / "dkim"
    folder.mkdir()
    lines, records = [], {}
    for domain, selector, algorithm in [
        ("client.test", "r", "rsa"),
        ("client.test", "e", "ed25519"),
        ("mtaq.test", "dsn", "rsa"),  # our hostname's domain: the reports we write
    ]:
        line, name, text = keygen(folder, domain, selector, algorithm)
        lines.append(line)
        records[name] = text
        dns.add(name, "TXT", text)
    table = folder / "dkim_keys"
    table.write_text("# DOMAIN SELECTOR KEYFILE\n" + "\n".join(lines) + "\n")
    route(dns, "a.test", "127.0.0.2")
    route(dns, "client.test", "127.0.0.9")
    return Keys(table, records)


def dkimpy_verdicts(message: bytes, zone: ZoneServer) -> list[bool]:
    """dkimpy's verdict on each signature, the keys looked up in the zone over DNS."""
    resolver = make_resolver([zone.address], timeout=2)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except dns.exception.DNSException:
            return b""
        return b"".join(b"".join(r.strings) for r in answer)

    d = dkimpy.DKIM(message)
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    out = []
    for i in range(count):
        try:
            out.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkimpy.DKIMException:
            out.append(False)
    return out


def submit(mta: MTA, sender: str, rcpts: list[str], data: bytes, *, source: str = "127.0.0.1") -> None:
    with smtplib.SMTP("127.0.0.1", mta.port, local_hostname="client.test", timeout=GENEROUS,
                      source_address=(source, 0)) as s:  # fmt: skip
        s.sendmail(sender, rcpts, data, mail_options=["BODY=8BITMIME"] if not data.isascii() else [])


# no Message-ID, no Date: the ingress adds both for a trusted client, before it signs
EIGHT_BIT = (
    f"From: Alice <{SENDER}>\r\nTo: <bob@a.test>\r\nSubject: greetings\r\n"
    "List-Unsubscribe: <https://client.test/u/1>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    "\r\nGrüße aus Köln\r\n"
).encode()


def test_keygen_records_published_in_dns_check_out(keys: Keys, dns: ZoneServer) -> None:
    p = mtaq("dkim", "check", "--dkim-keys", str(keys.table), "--dns-servers", f"127.0.0.1:{dns.port}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(": ok (") == 3, p.stdout
    # the RSA record replaced by the Ed25519 one's key: a mismatch, exit 1
    dns.remove("r._domainkey.client.test.", "TXT")
    dns.add("r._domainkey.client.test.", "TXT", keys.records["e._domainkey.client.test."].replace("ed25519", "rsa"))
    p = mtaq("dkim", "check", "--dkim-keys", str(keys.table), "--dns-servers", f"127.0.0.1:{dns.port}")
    assert p.returncode == 1
    assert "r._domainkey.client.test: MISMATCH: the published p= is another key's" in p.stdout, p.stdout


def test_trusted_8bit_mail_to_a_sink_without_8bitmime_verifies(
    keys: Keys, dns: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    require_maildkim()
    box = sinks("127.0.0.2")
    box.eightbitmime = False
    mta = mta_factory(dkim_keys=str(keys.table))
    mta.start_ingress()
    mta.start_worker()
    submit(mta, SENDER, ["bob@a.test"], EIGHT_BIT)
    assert wait_for(lambda: box.messages, GENEROUS), mta.logs()
    data = box.messages[0][2]
    assert data.isascii() and b"BODY=8BITMIME" not in b" ".join(o.encode() for o in box.deliveries[0].mail_options)
    assert data.count(b"DKIM-Signature:") == 2
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nMessage-ID: <" in head and b"@mtaq.test>" in head and b"\r\nDate: " in head  # added, then signed
    assert dkimpy_verdicts(data, dns) == [True, True], data.decode()
    verdicts = maildkim_verdicts(data, dns)
    assert "client.test rsa-sha256 pass" in verdicts, verdicts
    sig = dkimpy.DKIM(data)
    sig.verify(idx=0, dnsfunc=lambda name, timeout=5: b"")  # parse only: which fields h= covers
    covered = {h.lower() for h in sig.include_headers}
    assert {b"message-id", b"date", b"list-unsubscribe", b"list-unsubscribe-post", b"from"} <= covered


def test_strangers_mail_is_neither_changed_nor_signed(
    keys: Keys, dns: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    box = sinks("127.0.0.2")
    mta = mta_factory(dkim_keys=str(keys.table), mynetworks="127.0.0.1/32", relay_domains="a.test")
    mta.start_ingress()
    mta.start_worker()
    data = f"From: <{SENDER}>\r\nTo: <bob@a.test>\r\nSubject: from a stranger\r\n\r\nhi\r\n".encode()
    submit(mta, SENDER, ["bob@a.test"], data, source="127.0.0.7")
    assert wait_for(lambda: box.messages, GENEROUS), mta.logs()
    got = box.messages[0][2]
    assert b"DKIM-Signature" not in got and b"Message-ID" not in got and b"\r\nDate:" not in got
    assert got.endswith(data)


def test_our_delivery_report_is_signed_with_the_hostname_domain_key(
    keys: Keys, dns: ZoneServer, sinks: Callable[..., SinkServer], mta_factory: Callable[..., MTA]
) -> None:
    require_maildkim()
    remote = sinks("127.0.0.2")
    remote.rcpt_default = "550 5.1.1 no such user"
    home = sinks("127.0.0.9")
    mta = mta_factory(dkim_keys=str(keys.table))
    mta.start_ingress()
    mta.start_worker()
    submit(mta, "alice@client.test", ["nobody@a.test"], b"From: <alice@client.test>\r\nSubject: x\r\n\r\nhi\r\n")
    assert wait_for(lambda: home.messages, GENEROUS), mta.logs()
    report = home.messages[0][2]
    assert home.messages[0][0] == "" and b"MAILER-DAEMON@mtaq.test" in report
    assert b"d=mtaq.test" in report and dkimpy_verdicts(report, dns) == [True]
    assert maildkim_verdicts(report, dns) == ["mtaq.test rsa-sha256 pass"]


@pytest.mark.parametrize("role", ["run", "ingress", "worker"])
def test_a_bad_key_at_start_up_is_one_line_and_exit_78(
    tmp_path: Path, role: str, mta_factory: Callable[..., MTA]
) -> None:
    (tmp_path / "k.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    (tmp_path / "t").write_text("example.com s k.pem\n")
    mta = mta_factory()  # a Redis for the roles that connect first
    env = {**mta.env, "MTAQ_DKIM_KEYS": str(tmp_path / "t"), "MTAQ_DATA_DIR": str(tmp_path / "var")}
    if role == "run":
        env.pop("MTAQ_REDIS_URL")
    p = subprocess.run(
        [sys.executable, "-m", "mtaq", role], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 78, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("mtaq: ")]
    assert errors == [f"mtaq: dkim_keys {tmp_path / 't'} line 1: key file {tmp_path / 'k.pem'}: "
                      "not a PEM RSA or Ed25519 private key"], p.stderr  # fmt: skip
    assert "Traceback" not in p.stderr and "not base64" not in p.stderr
