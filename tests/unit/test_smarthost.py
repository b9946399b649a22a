"""Smarthost login (worker/smarthost.py, the AUTH exchange of common/smtp/client.py): credentials
only after TLS, PLAIN or LOGIN, a refusal defers, the file read strictly, failures logged once."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest

from common.settings import Settings
from common.smtp.client import Client, NeedTLS, Ready, Refused
from worker.smarthost import AuthLog, SmarthostError, parse_credentials, smarthost_from_settings

RELAY = "smtp.example.net[192.0.2.1]:587"
AUTH = ("app", "s3cret pass")


def _greet(c: Client, ehlo: bytes) -> None:
    c.receive_data(b"220 smtp.example.net ESMTP\r\n")
    assert c.data_to_send() == b"EHLO mta.example.org\r\n"
    c.receive_data(ehlo)


def _tls_then_ehlo(c: Client, ehlo: bytes) -> None:
    _greet(c, b"250-smtp.example.net\r\n250 STARTTLS\r\n")
    assert c.data_to_send() == b"STARTTLS\r\n"
    c.receive_data(b"220 go ahead\r\n")
    assert isinstance(c.next_event(), NeedTLS)
    c.tls_started()
    assert c.data_to_send() == b"EHLO mta.example.org\r\n"
    c.receive_data(ehlo)


def test_auth_plain_after_tls() -> None:
    c = Client("mta.example.org", RELAY, auth=AUTH)
    _tls_then_ehlo(c, b"250-smtp.example.net\r\n250 AUTH LOGIN PLAIN\r\n")
    line = c.data_to_send()
    assert line.startswith(b"AUTH PLAIN ") and base64.b64decode(line[11:]) == b"\0app\0s3cret pass"
    c.receive_data(b"235 2.7.0 Authentication successful\r\n")
    assert isinstance(c.next_event(), Ready) and c.authenticated


def test_auth_login_when_that_is_all() -> None:
    c = Client("mta.example.org", RELAY, auth=AUTH)
    _tls_then_ehlo(c, b"250-smtp.example.net\r\n250 AUTH LOGIN\r\n")
    assert c.data_to_send() == b"AUTH LOGIN\r\n"
    c.receive_data(b"334 VXNlcm5hbWU6\r\n")
    assert base64.b64decode(c.data_to_send()) == b"app"
    c.receive_data(b"334 UGFzc3dvcmQ6\r\n")
    assert base64.b64decode(c.data_to_send()) == b"s3cret pass"
    c.receive_data(b"235 2.7.0 ok\r\n")
    assert isinstance(c.next_event(), Ready)


def test_refused_login_is_refused_with_auth_and_its_reply() -> None:
    c = Client("mta.example.org", RELAY, auth=AUTH)
    _tls_then_ehlo(c, b"250-smtp.example.net\r\n250 AUTH PLAIN\r\n")
    c.data_to_send()
    c.receive_data(b"535 5.7.8 Authentication credentials invalid\r\n")
    event = c.next_event()
    assert isinstance(event, Refused) and event.auth and event.reply is not None and event.reply.code == 535
    assert "SASL authentication failed" in event.text and "s3cret" not in event.text
    assert c.data_to_send() == b"QUIT\r\n"


@pytest.mark.parametrize(
    ("ehlo", "why"),
    [
        (b"250-smtp.example.net\r\n250 AUTH PLAIN\r\n", "offered no STARTTLS"),
        (b"250 smtp.example.net\r\n", "offered no STARTTLS"),
    ],
)
def test_never_a_credential_without_tls(ehlo: bytes, why: str) -> None:
    c = Client("mta.example.org", RELAY, auth=AUTH, try_tls=False)
    _greet(c, ehlo)
    event = c.next_event()
    assert isinstance(event, Refused) and event.auth and why in event.text
    assert c.data_to_send() == b"QUIT\r\n"


def test_starttls_refused_or_helo_only_sends_nothing() -> None:
    c = Client("mta.example.org", RELAY, auth=AUTH)
    _greet(c, b"250-smtp.example.net\r\n250 STARTTLS\r\n")
    c.data_to_send()
    c.receive_data(b"454 4.7.0 TLS not available\r\n")
    event = c.next_event()
    assert isinstance(event, Refused) and event.auth and "refused STARTTLS" in event.text
    assert c.data_to_send() == b"QUIT\r\n"
    c = Client("mta.example.org", RELAY, auth=AUTH)
    _greet(c, b"502 5.5.1 what?\r\n")
    assert c.data_to_send() == b"HELO mta.example.org\r\n"
    c.receive_data(b"250 ok\r\n")
    event = c.next_event()
    assert isinstance(event, Refused) and event.auth and c.data_to_send() == b"QUIT\r\n"


def test_no_usable_mechanism() -> None:
    c = Client("mta.example.org", RELAY, auth=AUTH)
    _tls_then_ehlo(c, b"250-smtp.example.net\r\n250 AUTH CRAM-MD5 XOAUTH2\r\n")
    event = c.next_event()
    assert isinstance(event, Refused) and "no AUTH PLAIN or LOGIN" in event.text
    assert c.data_to_send() == b"QUIT\r\n"


def test_without_credentials_nothing_changes() -> None:
    c = Client("mta.example.org", RELAY)
    _tls_then_ehlo(c, b"250-smtp.example.net\r\n250 AUTH PLAIN\r\n")
    assert isinstance(c.next_event(), Ready) and c.data_to_send() == b""


@pytest.mark.parametrize(
    ("text", "expect"),
    [("app s3cret\n", ("app", "s3cret")), ("# c\napp:pa ss\n", ("app", "pa ss")), ("  a  b c \n", ("a", "b c"))],
)
def test_parse_credentials(text: str, expect: tuple[str, str]) -> None:
    assert parse_credentials(text, "f") == expect


@pytest.mark.parametrize("text", ["", "justuser\n", "a b\nc d\n", "user:\n"])
def test_bad_credentials_file(text: str) -> None:
    with pytest.raises(SmarthostError) as e:
        parse_credentials(text, "/etc/mtaq/relay")
    assert str(e.value).startswith("relayhost_auth_file /etc/mtaq/relay: ") and "\n" not in str(e.value)


def test_smarthost_from_settings(tmp_path: Path) -> None:
    (tmp_path / "auth").write_text("app s3cret\n")
    s = Settings(
        hostname="mx.example.org", relayhost="[SMTP.example.net]:587", relayhost_auth_file=str(tmp_path / "auth")
    )
    host = smarthost_from_settings(s)
    assert host is not None and host.applies("smtp.example.net", 587) and not host.applies("smtp.example.net", 25)
    assert "s3cret" not in repr(host)
    with pytest.raises(SmarthostError, match="relayhost is not"):
        smarthost_from_settings(s.replace(relayhost=""))
    with pytest.raises(SmarthostError, match="No such file"):
        smarthost_from_settings(s.replace(relayhost_auth_file=str(tmp_path / "nope")))
    assert smarthost_from_settings(s.replace(relayhost_auth_file="")) is None


def test_auth_failures_logged_once_per_relay(caplog: pytest.LogCaptureFixture) -> None:
    log = AuthLog()
    with caplog.at_level(logging.DEBUG, logger="mtaq.worker"):
        for _ in range(5):
            log.failed("smtp[192.0.2.1]:587", "SASL authentication failed; 535")
        log.succeeded("smtp[192.0.2.1]:587")
        log.failed("smtp[192.0.2.1]:587", "SASL authentication failed; 535")
    assert [r.levelno for r in caplog.records].count(logging.WARNING) == 2
