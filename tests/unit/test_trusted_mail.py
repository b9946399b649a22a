"""What the ingress does to trusted clients' mail (ingress/signing.py) and the worker at delivery
and to its own reports (worker/signing.py): Message-ID and Date, then DKIM signatures, prepared at
the ingress and finished by the worker, that dkimpy verifies."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.dkim import SigningKey, header_fields, split_message
from common.dkimkeys import KeyTable
from common.envelope import Envelope, Recipient
from common.store import Message
from ingress.signing import Prepared, TrustedMail, add_missing_fields
from tests.dkimkeys import dkimpy_verify, write_table
from worker.signing import DeliverySigner, ReportSigner, Unsignable

WHEN = 1_765_015_200.0  # Sat, 06 Dec 2025 10:00:00 +0000


def _delivered(out: Prepared, table: Path | None) -> bytes:
    """The message as a worker with ``table`` sends it: the envelope as it was stored (through its
    JSON form), the signatures finished in front."""
    env = Envelope.from_json(Envelope(id="Q", sender="a@example.com", recipients=[], dkim=out.pending).to_json())
    return DeliverySigner(KeyTable(str(table)) if table else None).signed(env, out.data, WHEN)


def _fields(data: bytes) -> dict[bytes, bytes]:
    return {n.lower(): v.strip() for n, v in header_fields(split_message(data)[0])}


def test_missing_message_id_and_date_added_in_front() -> None:
    out = add_missing_fields(
        b"From: a@example.com\r\n\r\nbody\r\n", queue_id="Q1", hostname="mx.example.net", when=WHEN
    )
    assert out == (
        b"Message-ID: <Q1@mx.example.net>\r\nDate: Sat, 06 Dec 2025 10:00:00 +0000\r\n"
        b"From: a@example.com\r\n\r\nbody\r\n"
    )


def test_present_fields_are_kept() -> None:
    msg = b"From: a@example.com\r\nmessage-id: <x@y>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nb\r\n"
    assert add_missing_fields(msg, queue_id="Q", hostname="h.example", when=WHEN) is msg
    msg = b"From: a@example.com\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nb\r\n"
    assert (
        add_missing_fields(msg, queue_id="Q", hostname="h.example", when=WHEN) == b"Message-ID: <Q@h.example>\r\n" + msg
    )


def test_header_only_and_header_less_messages() -> None:
    out = add_missing_fields(b"Subject: x\r\n", queue_id="Q", hostname="h.example", when=WHEN)
    assert out.startswith(b"Message-ID: <Q@h.example>\r\nDate: ") and out.endswith(b"\r\nSubject: x\r\n")
    out = add_missing_fields(b"\r\nbody\r\n", queue_id="Q", hostname="h.example", when=WHEN)
    assert out.startswith(b"Message-ID: <Q@h.example>\r\nDate: ") and out.endswith(b"\r\n\r\nbody\r\n")


def test_signed_with_the_parent_domain_key_including_added_fields(tmp_path: Path) -> None:
    table, keys = write_table(tmp_path, [("example.com", "r", "rsa"), ("example.com", "e", "ed25519")])
    prep = TrustedMail("mx.example.net", KeyTable(str(table)))
    out = prep.prepare(
        b"From: a@news.example.com\r\nTo: b@example.org\r\n\r\nhi\r\n", queue_id="Q", when=WHEN, body_8bit=False
    )
    assert b"DKIM-Signature:" not in out.data  # the worker puts them in front
    assert [(p.domain, p.selector) for p in out.pending] == [("example.com", "e"), ("example.com", "r")]
    sent = _delivered(out, table)
    assert sent.count(b"DKIM-Signature:") == 2 and sent.endswith(out.data)
    assert dkimpy_verify(sent, keys, index=0) and dkimpy_verify(sent, keys, index=1)
    sig = _fields(sent)[b"dkim-signature"]
    assert b"message-id" in sig and b"date" in sig
    assert _delivered(out, table) == sent  # deterministic: a retry sends the same signatures


def _prepared_at_the_ingress(folder: Path, selector: str, kind: str) -> Prepared:
    """A short message from example.com prepared with the one key of a fresh table in ``folder``."""
    table, _ = write_table(folder, [("example.com", selector, kind)])
    return TrustedMail("mx.example.net", KeyTable(str(table))).prepare(
        b"From: a@example.com\r\n\r\nhi\r\n", queue_id="Q", when=WHEN, body_8bit=False
    )


def _worker_table(folder: Path, entries: list[tuple[str, str, str]]) -> tuple[Path, dict[str, SigningKey]]:
    folder.mkdir()
    return write_table(folder, entries)


def test_a_key_rotated_out_since_reception_signs_afresh_with_the_domains_keys_now(tmp_path: Path) -> None:
    out = _prepared_at_the_ingress(tmp_path, "old", "rsa")
    rotated, keys = _worker_table(tmp_path / "new", [("example.com", "new", "ed25519")])
    sent = _delivered(out, rotated)
    assert b"s=new;" in sent and b"s=old;" not in sent and dkimpy_verify(sent, keys)


def test_no_key_on_the_worker_is_unsignable_not_unsigned(tmp_path: Path) -> None:
    out = _prepared_at_the_ingress(tmp_path, "r", "ed25519")
    other, _ = _worker_table(tmp_path / "other", [("example.org", "r", "ed25519")])
    with pytest.raises(Unsignable, match=r"no DKIM key for d=example\.com s=r"):
        _delivered(out, other)
    with pytest.raises(Unsignable, match="dkim_keys is not set"):
        _delivered(out, None)
    unsigned = dataclasses.replace(out, pending=())
    assert _delivered(unsigned, None) == out.data  # nothing to sign: as it is, keys or not


def test_no_key_for_the_domain_unsigned(tmp_path: Path) -> None:
    table, _ = write_table(tmp_path, [("example.com", "r", "ed25519")])
    prep = TrustedMail("mx.example.net", KeyTable(str(table)))
    out = prep.prepare(b"From: a@example.org\r\n\r\nhi\r\n", queue_id="Q", when=WHEN, body_8bit=False)
    assert b"DKIM-Signature" not in out.data and b"Message-ID: <Q@mx.example.net>" in out.data


def test_8bit_converted_and_no_longer_8bitmime(tmp_path: Path) -> None:
    table, keys = write_table(tmp_path, [("example.com", "e", "ed25519")])
    prep = TrustedMail("mx.example.net", KeyTable(str(table)))
    msg = (
        b"From: a@example.com\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + "Grüße\r\n".encode()
    )
    out = prep.prepare(msg, queue_id="Q", when=WHEN, body_8bit=True)
    assert not out.body_8bit and out.data.isascii() and dkimpy_verify(_delivered(out, table), keys)


def test_dsn_signed_with_the_hostname_domain_key(tmp_path: Path) -> None:
    table, keys = write_table(tmp_path, [("example.net", "e", "ed25519")])
    env = Envelope(id="D1", sender="", recipients=[Recipient("a@example.com")])
    body = (
        b"From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\nTo: a@example.com\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n\r\nreport\r\n"
    )
    signed = ReportSigner(KeyTable(str(table)))(Message(env, body), WHEN)
    assert signed.body.endswith(body) and dkimpy_verify(signed.body, keys)
    assert ReportSigner(None)(Message(env, body), WHEN).body == body
