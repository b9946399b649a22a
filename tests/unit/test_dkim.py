"""DKIM signing (common/dkim.py), checked by dkimpy's verifier."""

from __future__ import annotations

import re
from pathlib import Path

import dkim as dkimpy
import pytest
from dkim.canonicalization import Relaxed as DkimpyRelaxed
from hypothesis import given
from hypothesis import strategies as st

from common import dkim
from common.dkim import SigningKey, keys_for
from tests.dkimkeys import dkimpy_verify, new_key

NOW = 1_765_000_000

MESSAGE = (
    b"From: Alice <alice@news.example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject:   hello \t there\r\n"
    b"Date: Sun, 06 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@news.example.com>\r\n"
    b"List-Unsubscribe: <https://example.com/u/1>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"X-Not-Signed: 1\r\n"
    b"\r\n"
    b"Hello  Bob,   \r\n"
    b"\r\n"
    b"bye\r\n"
    b"\r\n\r\n"
)


def _key(kind: str, domain: str = "example.com", selector: str = "s1") -> SigningKey:
    return SigningKey(domain, selector, new_key(kind), "test")


def _keys(*ks: SigningKey) -> dict[str, SigningKey]:
    return {f"{k.selector}._domainkey.{k.domain}": k for k in ks}


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_signature_verifies_with_dkimpy(kind: str) -> None:
    key = _key(kind)
    signed = dkim.sign(MESSAGE, [key], NOW) + MESSAGE
    assert dkimpy_verify(signed, _keys(key))
    assert f"a={key.algorithm}".encode() in signed


def test_rsa_and_ed25519_both_verify() -> None:
    rsa_key, ed_key = _key("rsa", selector="r"), _key("ed25519", selector="e")
    signed = dkim.sign(MESSAGE, [rsa_key, ed_key], NOW) + MESSAGE
    assert signed.count(b"DKIM-Signature:") == 2
    keys = _keys(rsa_key, ed_key)
    assert dkimpy_verify(signed, keys, index=0) and dkimpy_verify(signed, keys, index=1)


def test_a_changed_body_or_header_fails() -> None:
    key = _key("ed25519")
    signed = dkim.sign(MESSAGE, [key], NOW) + MESSAGE
    assert not dkimpy_verify(signed.replace(b"bye", b"BYE"), _keys(key))
    assert not dkimpy_verify(signed.replace(b"Subject:   hello", b"Subject: bye"), _keys(key))
    # From is oversigned: one added on the way breaks the signature
    assert not dkimpy_verify(signed.replace(b"To: bob", b"From: evil@example.net\r\nTo: bob"), _keys(key))


def test_survives_refolding_and_trailing_space() -> None:
    """relaxed/relaxed: what relays do to whitespace does not break it."""
    key = _key("rsa")
    signed = dkim.sign(MESSAGE, [key], NOW) + MESSAGE
    mangled = signed.replace(b"Subject:   hello \t there", b"Subject: hello\r\n there")
    mangled = mangled.replace(b"bye\r\n", b"bye  \r\n")
    assert dkimpy_verify(mangled, _keys(key))


def test_signed_fields() -> None:
    key = _key("ed25519")
    field = dkim.sign(MESSAGE, [key], NOW)
    tags = dkimpy.util.parse_tag_value(field.partition(b":")[2].replace(b"\r\n\t", b""))
    names = tags[b"h"].decode().split(":")
    assert names.count("from") == 2  # oversigned
    for name in ("to", "subject", "date", "message-id", "list-unsubscribe", "list-unsubscribe-post"):
        assert name in names
    assert "x-not-signed" not in names
    assert tags[b"c"] == b"relaxed/relaxed" and tags[b"d"] == b"example.com" and tags[b"t"] == str(NOW).encode()
    assert all(len(line) <= 80 for line in field.split(b"\r\n"))


def test_a_long_h_is_folded_after_colons_and_verifies() -> None:
    key = _key("rsa")
    names = [b"Cc", b"Reply-To", b"In-Reply-To", b"References", b"MIME-Version", b"Content-Type", b"List-Id"]
    msg = MESSAGE.replace(b"\r\n\r\n", b"".join(b"\r\n" + n + b": x" for n in names) + b"\r\n\r\n", 1)
    field = dkim.sign(msg, [key], NOW)
    assert all(len(line) <= 80 for line in field.split(b"\r\n")) and b":\r\n\t" in field
    assert dkimpy_verify(field + msg, _keys(key))


def test_no_from_no_signature() -> None:
    assert dkim.sign(b"To: a@b.example\r\n\r\nhi\r\n", [_key("ed25519")], NOW) == b""
    assert dkim.sign(MESSAGE, [], NOW) == b""


def test_empty_body_and_headers_only() -> None:
    key = _key("rsa")
    for msg in (b"From: a@example.com\r\nSubject: x\r\n\r\n", b"From: a@example.com\r\nSubject: x\r\n"):
        assert dkimpy_verify(dkim.sign(msg, [key], NOW) + msg, _keys(key))


def test_from_domain() -> None:
    assert dkim.from_domain(MESSAGE) == "news.example.com"
    assert dkim.from_domain(b"From: =?utf-8?q?A?=\r\n <a@Example.COM.>\r\n\r\n") == "example.com"
    assert dkim.from_domain(b"From: a@x.example, b@y.example\r\n\r\n") is None
    assert dkim.from_domain(b"From: a@x.example\r\nFrom: b@x.example\r\n\r\n") is None
    assert dkim.from_domain(b"To: a@x.example\r\n\r\n") is None


@pytest.mark.parametrize(
    ("value", "domain"),
    [
        (b" <load@loadgen.test>", "loadgen.test"),  # the shortcut's forms
        (b" App <app@News.Example.COM.>", "news.example.com"),
        (b" app@x.example", "x.example"),
        (b" J. O'Neil <j@x.example>", "x.example"),
        (b' "Doe, J" <j@x.example>', "x.example"),  # the address parser's
        (b" j@x.example (J)", "x.example"),
        (b" <a@b.example", "b.example"),
        (b" Undisclosed:;", None),
        (b" <@x.example>", None),
        (b" a@x.example, b@y.example", None),
    ],
)
def test_from_domain_shortcut_and_parser_agree(
    value: bytes, domain: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = dkim.Parsed(b"", [(b"From", value)], True, 0)
    assert parsed.from_domain() == domain
    monkeypatch.setattr(dkim, "_PLAIN_FROM", re.compile(rb"(?!)"))  # the email package's parser only
    assert parsed.from_domain() == domain


def test_keys_for_nearest_parent() -> None:
    parent, child = _key("rsa", "example.com"), _key("rsa", "mail.example.com")
    table = {"example.com": (parent,), "mail.example.com": (child,)}
    assert keys_for(table, "news.example.com") == (parent,)
    assert keys_for(table, "a.mail.example.com") == (child,)
    assert keys_for(table, "EXAMPLE.com.") == (parent,)
    assert keys_for(table, "example.org") == ()
    assert keys_for(table, "com") == ()


def test_8bit_is_converted_before_signing() -> None:
    key = _key("ed25519")
    msg = (
        b"From: a@example.com\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + "Grüße\r\n".encode()
    )
    signed, converted = dkim.sign_7bit(msg, [key], NOW)
    assert converted and signed.isascii()
    assert dkimpy_verify(signed, _keys(key))


def test_unconvertible_8bit_is_signed_as_it_is() -> None:
    key = _key("rsa")
    msg = "From: a@example.com\r\nSubject: Grüße\r\n\r\nGrüße\r\n".encode()
    signed, converted = dkim.sign_7bit(msg, [key], NOW)
    assert not converted and signed.endswith(msg)
    assert dkimpy_verify(signed, _keys(key))


def test_repr_never_shows_the_key(tmp_path: Path) -> None:
    key = _key("rsa")
    assert "PRIVATE" not in repr(key) and "rsa" in repr(key)


@given(st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r\n", b"x", b"  ", b"\xc3\xa4"]), max_size=40))
def test_relaxed_body_is_dkimpy_relaxed(pieces: list[bytes]) -> None:
    """The whole-body canonicalization agrees with dkimpy's line by line one, on bodies as the
    ingress stores them (lines ending in CRLF)."""
    body = b"".join(pieces)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    assert dkim._relaxed_body(body) == DkimpyRelaxed.canonicalize_body(body)


_LINES = st.sampled_from(
    [b"From: a@example.com", b"From: <>", b"From: =?x?q?bad", b"To: b@example.org", b"Subject: \xff\xfe",
     b" folded", b"\tfolded", b"no colon here", b":empty name", b"", b"body  line \t", b"From: a@b@c", b"."]
)  # fmt: skip


@given(st.lists(_LINES, max_size=20))
def test_any_message_signs_or_not_without_raising(lines: list[bytes]) -> None:
    """Whatever a trusted client sends, the signer gives signatures or none; never an exception
    (the ingress would answer 451 to a message it could not prepare)."""
    msg = b"".join(line + b"\r\n" for line in lines)
    if dkim.from_domain(msg) is None:
        return
    signed, _ = dkim.sign_7bit(msg, [_ED_KEY], NOW)
    if signed.startswith(b"DKIM-Signature:"):
        assert dkimpy_verify(signed, _keys(_ED_KEY)), signed


_ED_KEY = SigningKey("example.com", "s", new_key("ed25519"))


def test_a_malformed_header_block_is_not_signed() -> None:
    for head in (b"From: a@example.com\r\nno colon here\r\n", b" leading fold\r\nFrom: a@example.com\r\n"):
        assert dkim.sign(head + b"\r\nbody\r\n", [_ED_KEY], NOW) == b""
    assert dkim.well_formed(b"From: a@example.com\r\nSubject: x\r\n\ty")


@given(st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r\n ", b"\r\n\t", b"x", b"  ", b"\xc3\xa4"]), max_size=30))
def test_relaxed_header_is_dkimpy_relaxed(pieces: list[bytes]) -> None:
    """The header canonicalization, which runs its substitutions only where there is folding or
    more than one space, agrees with dkimpy's on any value (folded, tabs, runs, none of them)."""
    value = b"".join(pieces)
    [(name, canon)] = DkimpyRelaxed.canonicalize_headers([(b"Sub ject ", value + b"\r\n")])
    assert dkim._relaxed_header(b"Sub ject ", value) == name + b":" + canon.removesuffix(b"\r\n")


def test_a_parsed_message_with_fields_in_front_signs_as_its_bytes() -> None:
    """The ingress parses a message once and puts Message-ID and Date in front of the parse: what
    it signs is what signing the resulting bytes gives (RSA PKCS#1 v1.5 is deterministic)."""
    key = _key("rsa")
    extra = b"Message-ID: <q@mx.example.net>\r\nDate: Sun, 06 Dec 2026 10:00:00 +0000\r\n"
    parsed = dkim.Parsed.of(MESSAGE).prepend(extra)
    assert parsed.message == extra + MESSAGE
    assert parsed.fields == dkim.header_fields(dkim.split_message(extra + MESSAGE)[0]) and parsed.well_formed
    assert parsed.from_domain() == "news.example.com"
    assert dkim.sign(parsed, [key], NOW) == dkim.sign(extra + MESSAGE, [key], NOW)
    assert dkim.sign_7bit(parsed, [key], NOW) == (dkim.sign(extra + MESSAGE, [key], NOW) + extra + MESSAGE, False)
    assert dkim.Parsed.of(MESSAGE).prepend(b"").message is MESSAGE
    bad = dkim.Parsed.of(b"From: a@example.com\r\nno colon\r\n\r\nbody\r\n").prepend(extra)
    assert not bad.well_formed and dkim.sign(bad, [key], NOW) == b""


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_a_signature_prepared_and_finished_later_is_the_one_signed_at_once(kind: str) -> None:
    """The ingress prepares (presign), the worker finishes at delivery (finish): the same field,
    octet for octet, as signing at once; each key signs only its own pending signature."""
    key, other = _key(kind), _key(kind, selector="s2")
    pending = dkim.presign(MESSAGE, [key, other], NOW)
    assert [(p.domain, p.selector, p.algorithm) for p in pending] == [
        ("example.com", "s1", key.algorithm),
        ("example.com", "s2", key.algorithm),
    ]
    assert dkim.finish(pending[1], other) + dkim.finish(pending[0], key) == dkim.sign(MESSAGE, [key, other], NOW)
    with pytest.raises(ValueError, match=r"not the key of d=example\.com s=s1"):
        dkim.finish(pending[0], other)
    assert dkim.presign(b"To: a@b.example\r\n\r\nhi\r\n", [key], NOW) == []
