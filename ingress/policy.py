"""Pure policy for the ingress: SMTP path parsing and the relay decision.

Nothing here does IO. ``parse_path`` implements the Path/Mailbox grammar of RFC 5321 §4.1.2 (with
RFC 6531 §3.3 for UTF-8 addresses); ``relay_check`` decides who may send where, as Postfix does with
``permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination`` and
``allow_untrusted_routing = no``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable

from ingress import replies
from ingress.replies import Reply

__all__ = [
    "MAX_DOMAIN",
    "MAX_LOCAL_PART",
    "MAX_PATH",
    "Network",
    "PathError",
    "in_relay_domains",
    "is_trusted",
    "parse_forward_path",
    "parse_path",
    "parse_reverse_path",
    "relay_check",
    "unquote_local_part",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 5321 §4.5.3.1.1: a local part is at most 64 octets.
MAX_LOCAL_PART = 64
# RFC 5321 §4.5.3.1.2: a domain is at most 255 octets.
MAX_DOMAIN = 255
# RFC 5321 §4.5.3.1.3: a path, angle brackets included, is at most 256 octets.
MAX_PATH = 256

# RFC 5321 §4.1.2 atext (RFC 5322 §3.2.3): ALPHA / DIGIT / these specials.
_ATEXT_SPECIALS = frozenset("!#$%&'*+-/=?^_`{|}~")
# Local-part characters that route mail onward when an untrusted client hides them in the local part
# of a relay domain's recipient (percent hack, bang path, a second @): Postfix allow_untrusted_routing.
_ROUTING_CHARS = frozenset("@%!")


class PathError(ValueError):
    """A path the client sent is unacceptable; ``reply`` is what to answer."""

    def __init__(self, reply: Reply, why: str = "") -> None:
        super().__init__(why or reply.text)
        self.reply = reply


def _bad(why: str) -> PathError:
    return PathError(replies.BAD_ADDRESS, why)


def _is_atext(ch: str, smtputf8: bool) -> bool:
    if ch.isascii():
        return ch.isalnum() or ch in _ATEXT_SPECIALS
    return smtputf8 and _utf8_ok(ch)  # RFC 6531 §3.3: atext =/ UTF8-non-ascii


def _utf8_ok(ch: str) -> bool:
    """A non-ASCII character we accept in an address: printable and not a space (no NBSP, no
    U+2028 line separator, no bidi controls)."""
    return ch.isprintable() and not ch.isspace()


def _check_dot_string(local: str, smtputf8: bool) -> None:
    if not local:
        raise _bad("empty local part")
    for atom in local.split("."):
        if not atom:
            raise _bad("empty atom in local part")
        if not all(_is_atext(ch, smtputf8) for ch in atom):
            raise _bad("invalid character in local part")


def _check_quoted_string(local: str, smtputf8: bool) -> None:
    # Quoted-string = DQUOTE *QcontentSMTP DQUOTE; qtextSMTP = %d32-33 / %d35-91 / %d93-126;
    # quoted-pairSMTP = "\" %d32-126 (RFC 5321 §4.1.2).
    if len(local) < 2 or not local.startswith('"') or not local.endswith('"'):
        raise _bad("unterminated quoted string")
    body = local[1:-1]
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            if i + 1 >= len(body) or not (32 <= ord(body[i + 1]) <= 126):
                raise _bad("bad quoted pair")
            i += 2
            continue
        if ch == '"':
            raise _bad("stray quote")
        if not ch.isascii():
            if not (smtputf8 and _utf8_ok(ch)):
                raise _bad("non-ASCII")
        elif not 32 <= ord(ch) <= 126:
            raise _bad("control character in quoted string")
        i += 1


def unquote_local_part(local: str) -> str:
    """The local part as the mailbox owner sees it: quotes and quoted pairs removed."""
    if not (len(local) >= 2 and local.startswith('"') and local.endswith('"')):
        return local
    out = []
    body = local[1:-1]
    i = 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            i += 1
        out.append(body[i])
        i += 1
    return "".join(out)


def _check_domain(domain: str, smtputf8: bool) -> None:
    """Domain (RFC 5321 §4.1.2, U-labels allowed under RFC 6531 §3.3) or address literal.

    A single trailing dot is tolerated, as Postfix does; ``parse_path`` strips it."""
    if not domain:
        raise _bad("empty domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise _bad("domain too long")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise _bad("unterminated address literal")
        literal = domain[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            # General-address-literal (RFC 5321 §4.1.3) has no registered tags we could deliver to.
            raise _bad("bad address literal") from None
        return
    labels = domain[:-1].split(".") if domain.endswith(".") else domain.split(".")
    for label in labels:
        if not label or len(label.encode("utf-8")) > 63:
            raise _bad("bad domain label")
        if label[0] == "-" or label[-1] == "-":
            raise _bad("hyphen at label edge")
        for ch in label:
            if ch.isascii():
                if not (ch.isalnum() or ch == "-"):
                    raise _bad("invalid character in domain")
            elif not (smtputf8 and _utf8_ok(ch)):
                raise _bad("non-ASCII domain")


def _split_mailbox(mailbox: str) -> tuple[str, str]:
    """Split at the @ that separates local part from domain: the last one outside quotes."""
    if mailbox.startswith('"'):
        # Find the closing quote, honouring quoted pairs.
        i = 1
        while i < len(mailbox):
            if mailbox[i] == "\\":
                i += 2
                continue
            if mailbox[i] == '"':
                break
            i += 1
        else:
            raise _bad("unterminated quoted string")
        local, rest = mailbox[: i + 1], mailbox[i + 1 :]
        if not rest.startswith("@"):
            raise _bad("missing domain")
        return local, rest[1:]
    local, at, domain = mailbox.rpartition("@")
    if not at:
        raise _bad("missing domain")
    return local, domain


def _strip_source_route(path: str) -> str:
    """Drop an A-d-l source route ``@a,@b:`` (RFC 5321 §4.1.1.3 and appendix C: servers SHOULD accept
    and ignore it), after checking that it is well formed."""
    if not path.startswith("@"):
        return path
    route, colon, rest = path.partition(":")
    if not colon:
        raise _bad("source route without colon")
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise _bad("bad source route")
        domain = hop[1:]
        if domain.startswith("["):
            raise _bad("address literal in source route")
        _check_domain(domain, smtputf8=True)  # non-ASCII was checked for the whole path already
    return rest


# The path nearly every client sends, ``<dot-atom@ldh.labels>`` in ASCII (brackets optional), in one
# match: the checks below step through it a character at a time in Python (2.3-4.9 us a path, two
# a message; 0.5-0.7 us here). What it accepts, the checks below accept and return unchanged;
# anything else (quotes, UTF-8, literals, routes, trailing dots, long parts) goes through them.
_ATOM = "[A-Za-z0-9" + re.escape("".join(sorted(_ATEXT_SPECIALS))) + "]+"  # the atext the checks take
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN_PATH = re.compile(rf"<?({_ATOM}(?:\.{_ATOM})*)@({_LABEL}(?:\.{_LABEL})*)>?")


def _plain_path(text: str) -> str | None:
    m = _PLAIN_PATH.fullmatch(text)
    if m is None or (text[0] == "<") != (text[-1] == ">") or len(text) > MAX_PATH:
        return None
    local, domain = m.group(1), m.group(2)
    if len(local) > MAX_LOCAL_PART or len(domain) > MAX_DOMAIN:
        return None
    return f"{local}@{domain}"


def parse_path(text: str, *, smtputf8: bool) -> str:
    """Parse an RFC 5321 Path (``<local@domain>``) and return the mailbox without brackets or route.

    ``<>`` returns ``""`` (the null reverse path) and ``<postmaster>`` (any case) returns it bare;
    whether those are allowed depends on the command (``parse_reverse_path``/``parse_forward_path``).
    Angle brackets may be left out, as Postfix accepts with ``strict_rfc821_envelopes = no``.
    Raises ``PathError`` with 501 5.1.3, or 553 5.6.7 for a non-ASCII path without SMTPUTF8
    (RFC 6531 §3.5)."""
    plain = _plain_path(text)
    if plain is not None:
        return plain
    if len(text.encode("utf-8")) > MAX_PATH:
        raise _bad("path too long")
    if not text.isascii() and not smtputf8:
        raise PathError(replies.NON_ASCII_ADDRESS)
    if text.startswith("<"):
        if not text.endswith(">") or len(text) < 2:
            raise _bad("unterminated path")
        inner = text[1:-1]
    else:
        inner = text
    if inner == "":
        return ""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in inner):
        raise _bad("control character in path")  # spaces are checked by the grammar below
    mailbox = _strip_source_route(inner)
    if mailbox.lower() == "postmaster":
        return mailbox
    local, domain = _split_mailbox(mailbox)
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise _bad("local part too long")
    if local.startswith('"'):
        _check_quoted_string(local, smtputf8)
    else:
        _check_dot_string(local, smtputf8)
    _check_domain(domain, smtputf8)
    # Postfix strips the trailing dot of a domain (trivial-rewrite) before it looks at the address:
    # ``user@ours.test.`` is ``user@ours.test`` for policy, storage and the next hop alike
    return f"{local}@{domain.removesuffix('.')}"


def parse_reverse_path(text: str, *, smtputf8: bool) -> str:
    """MAIL FROM: a Path or ``<>`` (RFC 5321 §4.1.1.2)."""
    address = parse_path(text, smtputf8=smtputf8)
    if "@" not in address and address != "":
        raise _bad("reverse path without domain")
    return address


def parse_forward_path(text: str, *, smtputf8: bool) -> str:
    """RCPT TO: a Path or ``<Postmaster>`` (RFC 5321 §4.1.1.3); never ``<>``."""
    address = parse_path(text, smtputf8=smtputf8)
    if address == "":
        raise _bad("null forward path")
    return address


@functools.lru_cache(maxsize=1024)  # asked for each message; clients come back (pure function)
def _client_address(client_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # a dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d
    return addr


def is_trusted(client_ip: str, auth_user: str | None, networks: Iterable[Network]) -> bool:
    """Authenticated, or connecting from one of ``networks`` (Postfix mynetworks)."""
    if auth_user is not None:
        return True
    addr = _client_address(client_ip)
    if addr is None:
        return False
    return any(addr.version == net.version and addr in net for net in networks)


def in_relay_domains(address: str, relay_domains: frozenset[str]) -> bool:
    """Whether ``address``'s domain is one of ``relay_domains`` (any case, trailing dot or not)."""
    _, at, domain = address.rpartition("@")
    return bool(at) and domain.lower().rstrip(".") in {d.lower().rstrip(".") for d in relay_domains}


def relay_check(
    client_ip: str,
    auth_user: str | None,
    address: str,
    networks: Iterable[Network],
    relay_domains: frozenset[str],
) -> Reply | None:
    """None when ``address`` (as returned by ``parse_path``) may be accepted, else the reply.

    Trusted clients (mynetworks, authenticated) relay anywhere. Anyone else may only send to a
    domain in ``relay_domains``, and then only with a plain local part: ``%``, ``!`` or ``@`` in it
    (after unquoting) would make a downstream host route the mail elsewhere, and an IP-literal domain
    is never one of ours. The bare local ``postmaster`` is always accepted (RFC 5321 §4.5.1)."""
    if is_trusted(client_ip, auth_user, networks):
        return None
    if address.lower() == "postmaster":
        return None
    local, at, domain = address.rpartition("@")
    if not at or not domain or domain.startswith("["):
        return replies.RELAY_DENIED
    if any(ch in _ROUTING_CHARS for ch in unquote_local_part(local)):
        return replies.RELAY_DENIED
    wanted = {d.lower().rstrip(".") for d in relay_domains}
    if domain.lower().rstrip(".") in wanted:
        return None
    return replies.RELAY_DENIED
