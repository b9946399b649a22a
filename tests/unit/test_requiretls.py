"""REQUIRETLS (RFC 8689): the ingress offers and takes it only over TLS; the worker sends such mail
only over a verified session to a server offering it; ``TLS-Required: No`` relaxes policy failures."""

from __future__ import annotations

import ipaddress

from common.envelope import Envelope, RcptState, Recipient
from ingress import replies
from ingress.session import Peer, Send, Session, SessionConfig, Transaction
from worker.parcel import Parcel, Undeliverable
from worker.relay import mail_options
from worker.smtpclient import SMTPConnection
from worker.tlspolicy import TLSUsed, requiretls_refusal, tls_required_no


def session(*, tls: bool) -> Session:
    cfg = SessionConfig(
        hostname="mx.example.net",
        max_message_size=2000,
        max_recipients=3,
        max_errors=20,
        networks=(ipaddress.ip_network("192.0.2.0/24"),),
        relay_domains=frozenset(),
        tls_available=True,
        auth_available=False,
    )
    s = Session(cfg, Peer("192.0.2.7", 40000, "client.example"), tls=tls)
    s.start()
    return s


def say(s: Session, line: bytes) -> bytes:
    return b"".join(e.data for e in s.receive_data(line) if isinstance(e, Send))


def test_ingress_offers_and_takes_requiretls_only_over_tls() -> None:
    plain = session(tls=False)
    assert b"REQUIRETLS" not in say(plain, b"EHLO client.example\r\n")
    assert say(plain, b"MAIL FROM:<a@example.com> REQUIRETLS\r\n") == replies.REQUIRETLS_NEEDS_TLS.to_bytes()
    assert replies.REQUIRETLS_NEEDS_TLS.code == 530 and replies.REQUIRETLS_NEEDS_TLS.enhanced == "5.7.10"
    tls = session(tls=True)
    assert b"REQUIRETLS" in say(tls, b"EHLO client.example\r\n")
    assert say(tls, b"MAIL FROM:<a@example.com> REQUIRETLS\r\n") == replies.SENDER_OK.to_bytes()
    tls2 = session(tls=True)
    say(tls2, b"EHLO client.example\r\n")
    assert say(tls2, b"MAIL FROM:<a@example.com> REQUIRETLS=yes\r\n") == replies.BAD_PARAM_VALUE.to_bytes()


def test_requiretls_refusal() -> None:
    dane = TLSUsed("verified(dane)", "TLSv1.3", "X")
    assert requiretls_refusal(dane, True, "mx[1.2.3.4]:25") is None
    assert requiretls_refusal(TLSUsed("verified(mta-sts)"), True, "mx") is None
    assert "does not offer" in (requiretls_refusal(dane, False, "mx") or "")
    for level in ("opportunistic", "none", "verified(pkix)"):
        assert "not verified by DANE or MTA-STS" in (requiretls_refusal(TLSUsed(level), True, "mx") or "")


def test_tls_required_no_header() -> None:
    assert tls_required_no(b"From: a\r\nTLS-Required: No\r\n\r\nbody")
    assert tls_required_no(b"tls-required:\r\n  no\r\nX: y\r\n\r\n")
    assert not tls_required_no(b"From: a\r\n\r\nTLS-Required: No\r\n")  # in the body: not a header
    assert not tls_required_no(b"TLS-Required: Yes\r\n\r\n")
    env = Envelope("Q1", "a@example.com", [Recipient("b@example.org")])
    assert Parcel(env, b"TLS-Required: No\r\n\r\nx", [0]).relaxed
    env.requiretls = True  # REQUIRETLS wins over the header (RFC 8689 §4.2.1)
    assert not Parcel(env, b"TLS-Required: No\r\n\r\nx", [0]).relaxed


def test_a_requiretls_message_bounces_5_7_30_on_an_unverified_session() -> None:
    env = Envelope("Q1", "a@example.com", [Recipient("b@example.org")], requiretls=True)
    conn = SMTPConnection(helo_name="me.test", connect_timeout=1, timeout=1)
    conn.tls_used = TLSUsed("opportunistic", "TLSv1.3", "X")
    try:
        mail_options(env, b"x", conn)
    except Undeliverable as e:
        assert e.outcome.state is RcptState.BOUNCED and e.outcome.dsn == "5.7.30"
    else:
        raise AssertionError("sent without verified TLS")
    assert Transaction.__dataclass_fields__["requiretls"].default is False
