"""Path parsing (RFC 5321 §4.1.2, RFC 6531) and the relay decision, with an open-relay corpus."""

from __future__ import annotations

import ipaddress

import pytest

from ingress import policy, replies
from ingress.policy import (
    PathError,
    is_trusted,
    parse_forward_path,
    parse_path,
    parse_reverse_path,
    relay_check,
    unquote_local_part,
)

NETWORKS = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"))
RELAY_DOMAINS = frozenset({"ourdomain.com"})
UNTRUSTED = "203.0.113.9"
TRUSTED = "192.0.2.7"


# -- parse_path: valid ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<user@example.com>", "user@example.com"),
        ("<first.last+tag@sub.example.com>", "first.last+tag@sub.example.com"),
        ("<!#$%&'*+-/=?^_`{|}~@example.com>", "!#$%&'*+-/=?^_`{|}~@example.com"),
        ('<"john doe"@example.com>', '"john doe"@example.com'),
        ('<"a\\"b"@example.com>', '"a\\"b"@example.com'),
        ('<"a>b"@example.com>', '"a>b"@example.com'),
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]"),
        ("<user@example.com.>", "user@example.com"),  # tolerated and stripped, as Postfix does (11.9)
        ("<@relay.test.:user@Example.COM.>", "user@Example.COM"),
        ("<@a.example,@b.example:user@c.example>", "user@c.example"),  # RFC 5321 §4.1.1.3: route dropped
        ("<@a.example:user@c.example>", "user@c.example"),
        ("user@example.com", "user@example.com"),  # no brackets: Postfix strict_rfc821_envelopes=no
        ("<>", ""),
        ("<Postmaster>", "Postmaster"),
        ("<x-1@a-b.example>", "x-1@a-b.example"),
    ],
)
def test_valid_paths(text: str, expected: str) -> None:
    assert parse_path(text, smtputf8=False) == expected


@pytest.mark.parametrize(
    "text",
    [
        "<user>",
        "<user@>",
        "<@example.com>",
        "<.user@example.com>",
        "<user.@example.com>",
        "<us..er@example.com>",
        "<us er@example.com>",
        "<user@exa mple.com>",
        "<user@-example.com>",
        "<user@example-.com>",
        "<user@exa_mple.com>",
        "<user@example..com>",
        "<user@[300.1.1.1]>",
        "<user@[IPv6:zz::1]>",
        "<user@[tag:content]>",
        "<user@[192.0.2.1>",
        '<"unterminated@example.com>',
        '<"a"b@example.com>',
        "<a@b@example.com>",
        "<user@example.com",
        "<@a.example user@c.example>",
        "<@a.example,b.example:user@c.example>",
        "<user\x00@example.com>",
        "<" + "a" * 65 + "@example.com>",  # RFC 5321 §4.5.3.1.1: local part <= 64
        "<a@" + "b" * 64 + ".com>",  # a label <= 63
        "<a@" + ("b" * 60 + ".") * 5 + "com>",  # path <= 256
        '<"\x01"@example.com>',
    ],
)
def test_invalid_paths(text: str) -> None:
    with pytest.raises(PathError) as exc:
        parse_path(text, smtputf8=True)
    assert exc.value.reply == replies.BAD_ADDRESS


def test_non_ascii_needs_smtputf8() -> None:
    with pytest.raises(PathError) as exc:
        parse_path("<jörg@example.com>", smtputf8=False)
    assert exc.value.reply == replies.NON_ASCII_ADDRESS  # RFC 6531 §3.5: 553 5.6.7
    with pytest.raises(PathError) as exc:
        parse_path("<user@bücher.example>", smtputf8=False)
    assert exc.value.reply == replies.NON_ASCII_ADDRESS


def test_non_ascii_with_smtputf8() -> None:
    assert parse_path("<jörg@bücher.example>", smtputf8=True) == "jörg@bücher.example"
    assert parse_path('<"jö rg"@example.com>', smtputf8=True) == '"jö rg"@example.com'


def test_null_path_only_for_mail() -> None:
    assert parse_reverse_path("<>", smtputf8=False) == ""
    with pytest.raises(PathError) as exc:
        parse_forward_path("<>", smtputf8=False)
    assert exc.value.reply == replies.BAD_ADDRESS


def test_postmaster_only_for_rcpt() -> None:
    assert parse_forward_path("<postmaster>", smtputf8=False) == "postmaster"
    assert parse_forward_path("<POSTMASTER>", smtputf8=False) == "POSTMASTER"
    with pytest.raises(PathError):
        parse_reverse_path("<postmaster>", smtputf8=False)
    with pytest.raises(PathError):
        parse_forward_path("<someone>", smtputf8=False)


def test_unquote() -> None:
    assert unquote_local_part('"user@foreign"') == "user@foreign"
    assert unquote_local_part('"a\\"b"') == 'a"b'
    assert unquote_local_part("plain") == "plain"


# -- trust ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ip", "auth", "trusted"),
    [
        ("192.0.2.7", None, True),
        ("::ffff:192.0.2.7", None, True),  # IPv4 client on a dual-stack socket
        ("2001:db8::5", None, True),
        ("203.0.113.9", None, False),
        ("::ffff:203.0.113.9", None, False),
        ("203.0.113.9", "alice", True),
        ("not-an-ip", None, False),
    ],
)
def test_is_trusted(ip: str, auth: str | None, trusted: bool) -> None:
    assert is_trusted(ip, auth, NETWORKS) is trusted


# -- relay_check -----------------------------------------------------------------------------------
def check(ip: str, text: str, auth: str | None = None) -> replies.Reply | None:
    return relay_check(ip, auth, parse_forward_path(text, smtputf8=False), NETWORKS, RELAY_DOMAINS)


@pytest.mark.parametrize(
    "text",
    ["<user@ourdomain.com>", "<USER@OURDOMAIN.COM>", "<user@ourdomain.com.>", "<User@OurDomain.Com.>", "<postmaster>"],
)
def test_anyone_may_send_to_relay_domains(text: str) -> None:
    assert check(UNTRUSTED, text) is None


# The open-relay corpus: every one of these tries to get an untrusted client's mail relayed to a
# foreign host. All must be refused for an untrusted client and all are fine for mynetworks.
OPEN_RELAY_CORPUS = [
    "<user@foreign.com>",
    "<user@foreign.com.>",  # trailing dot
    "<USER@FOREIGN.COM>",
    "<user%foreign.com@ourdomain.com>",  # percent hack
    "<user%foreign.com@OURDOMAIN.COM>",
    "<@ourdomain.com:user@foreign.com>",  # source route: the route is dropped, foreign remains
    "<@ourdomain.com,@relay.ourdomain.com:user@foreign.com>",
    '<"user@foreign.com"@ourdomain.com>',  # quoted @
    '<"user%foreign.com"@ourdomain.com>',
    '<"user\\@foreign.com"@ourdomain.com>',
    "<foreign.com!user@ourdomain.com>",  # bang path
    '<"foreign.com!user"@ourdomain.com>',
    "<user@[203.0.113.50]>",  # IP literals
    "<user@[192.0.2.1]>",
    "<user@[IPv6:2001:db8::1]>",
    "<user@ourdomain.com.foreign.com>",
    "<user@sub.ourdomain.com>",  # subdomains are not implied (Postfix parent_domain_matches_subdomains off)
    "<user@foreign.com@ourdomain.com>",  # syntax error in fact, refused either way
]


@pytest.mark.parametrize("text", OPEN_RELAY_CORPUS)
def test_open_relay_corpus_refused_for_untrusted(text: str) -> None:
    try:
        address = parse_forward_path(text, smtputf8=False)
    except PathError as exc:
        assert exc.reply == replies.BAD_ADDRESS
        return
    assert relay_check(UNTRUSTED, None, address, NETWORKS, RELAY_DOMAINS) == replies.RELAY_DENIED


@pytest.mark.parametrize("text", [t for t in OPEN_RELAY_CORPUS if t != "<user@foreign.com@ourdomain.com>"])
def test_open_relay_corpus_fine_for_mynetworks_and_authenticated(text: str) -> None:
    assert check(TRUSTED, text) is None
    assert check(UNTRUSTED, text, auth="alice") is None


def test_empty_relay_domains_refuses_everything_untrusted() -> None:
    assert relay_check(UNTRUSTED, None, "user@ourdomain.com", NETWORKS, frozenset()) == replies.RELAY_DENIED


def test_relay_domains_given_with_odd_case_and_dot() -> None:
    assert relay_check(UNTRUSTED, None, "user@ourdomain.com", (), frozenset({"OurDomain.COM."})) is None


@pytest.mark.parametrize("text", ["<a\u00a0b@example.com>", "<ab@exa\u2028mple.com>", '<"a\u200fb"@example.com>'])
def test_non_ascii_spaces_and_controls_refused_even_with_smtputf8(text: str) -> None:
    with pytest.raises(PathError):
        parse_path(text, smtputf8=True)


# -- the plain-path shortcut agrees with the full checks -------------------------------------------

EDGES = [
    "<a@b>",
    "a@b",
    "<a@b",
    "a@b>",
    "<a.b+c@d-e.f>",
    "<a..b@c>",
    "<.a@b>",
    "<a.@b>",
    "<a@-b.c>",
    "<a@b-.c>",
    "<a@b.>",
    "<a@b..c>",
    "<" + "l" * 64 + "@d>",
    "<" + "l" * 65 + "@d>",
    "<a@" + "d" * 63 + ">",
    "<a@" + "d" * 64 + ">",
    "<a@" + ".".join(["d" * 63] * 4) + ">",
    "<" + "l" * 64 + "@" + ".".join(["d" * 63] * 3) + "." + "d" * 29 + ">",
    "<>",
    "<postmaster>",
    "<@r.test:a@b>",
    '<"a b"@c>',
    "<a@[127.0.0.1]>",
    "<é@b>",
    "<a b@c>",
    "<a@b c>",
]


def _outcome(text: str, smtputf8: bool) -> tuple[str, object]:
    try:
        return "ok", parse_path(text, smtputf8=smtputf8)
    except PathError as e:
        return "refused", e.reply


@pytest.mark.parametrize("text", EDGES)
@pytest.mark.parametrize("smtputf8", [False, True])
def test_plain_path_shortcut_changes_no_verdict(text: str, smtputf8: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _outcome(text, smtputf8)
    monkeypatch.setattr(policy, "_plain_path", lambda text: None)  # the full checks only
    assert _outcome(text, smtputf8) == fast


def test_plain_path_shortcut_takes_the_common_paths() -> None:
    assert policy._plain_path("<load@loadgen.test>") == "load@loadgen.test"
    assert policy._plain_path("a.b+c@d-e.f") == "a.b+c@d-e.f"
    assert policy._plain_path("<a@b.>") is None  # a trailing dot: the full checks strip it
    assert policy._plain_path('<"q"@b>') is None
