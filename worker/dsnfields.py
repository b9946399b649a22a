"""The field values and lines of a delivery status report (worker/dsn.py): RFC 5322 folding,
RFC 3464 address fields with RFC 6533's ``utf-8`` address type, CRLF and quoted-printable.

``international`` everywhere means the report is ``message/global-delivery-status`` (8-bit UTF-8
allowed); otherwise every value is 7-bit, non-ASCII written as RFC 6533's ``\\x{HEX}``.
"""

from __future__ import annotations

import quopri
import re

__all__ = [
    "MAX_LINE",
    "address_field",
    "crlf",
    "cte",
    "escape",
    "field",
    "field_text",
    "header_section",
    "lines_ok",
    "one_line",
    "orcpt_field",
    "quoted_printable",
    "seven_bit_clean",
    "strip_final_crlf",
]

MAX_LINE = 998
"""RFC 5322 §2.1.1: at most 998 characters on a line, CRLF excluded."""

_FOLD_AT = 78
"""RFC 5322 §2.1.1: lines SHOULD be no longer than 78 characters."""

_EMBEDDED_RE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")  # RFC 6533 EmbeddedUnicodeChar


def field(name: str, value: str) -> bytes:
    """``Name: value`` CRLF, folded at spaces to 78 columns where it can be (RFC 5322 §2.2.3)."""
    line = f"{name}: {value}"
    out: list[str] = []
    while len(line) > _FOLD_AT:
        cut = line.rfind(" ", len(name) + 2, _FOLD_AT)
        if cut <= 0:
            cut = line.find(" ", _FOLD_AT)
        if 0 < cut <= MAX_LINE:
            out.append(line[:cut])
            line = line[cut:]  # the continuation line starts with the space (folding white space)
        elif len(line) > MAX_LINE:
            # One word longer than a line may be: split it (a space in the value beats a broken line).
            out.append(line[:_FOLD_AT])
            line = " " + line[_FOLD_AT:]
        else:
            break
        if not line.strip():
            break
    out.append(line)
    result = "\r\n".join(out) + "\r\n"
    return result.encode("utf-8")


def cte(value: str) -> bytes:
    return field("Content-Transfer-Encoding", value)


def one_line(value: str) -> str:
    """No CR, LF or other controls: a multi-line SMTP reply becomes one line."""
    return " ".join("".join(c if c.isprintable() else " " for c in value).split())


def escape(value: str) -> str:
    """One line of printable ASCII: each non-ASCII character as RFC 6533's ``\\x{HEX}``, the one
    notation a 7-bit report uses for addresses and text alike."""
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in one_line(value))


def field_text(value: str, international: bool) -> str:
    """Free text in a field: UTF-8 as it is in an internationalized report, else ``_escape``."""
    return one_line(value) if international else escape(value)


def utf8_addr(address: str, international: bool) -> str:
    """RFC 6533 §3: ``utf-8-addr-unitext`` (UTF-8 kept) in message/global-delivery-status,
    ``utf-8-addr-xtext`` (all 7-bit) elsewhere. Either way the ASCII characters xtext reserves
    (controls, space, ``\\``, ``+``, ``=``) become ``\\x{HEX}``."""
    out: list[str] = []
    for c in address:
        if ("\x21" <= c <= "\x7e" and c not in "\\+=") or (international and not c.isascii()):
            out.append(c)
        else:
            out.append(f"\\x{{{ord(c):02X}}}")
    return "".join(out)


def address_field(address: str, international: bool) -> str:
    """``rfc822; addr``, or ``utf-8; addr`` (RFC 6533) when the address is not ASCII."""
    address = one_line(address)
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {utf8_addr(address, international)}"


def orcpt_field(orcpt: str, international: bool) -> str:
    """ORCPT arrives as ``addr-type;address`` (RFC 3461 §4.2, xtext decoded); a bare address is
    taken as rfc822. A ``utf-8`` one may carry ``\\x{HEX}`` escapes: decoded, then written in the
    form this report uses, so that one report has one escaping."""
    kind, sep, address = one_line(orcpt).partition(";")
    kind, address = kind.strip().lower(), address.strip()
    if not (sep and kind and re.fullmatch(r"[a-z0-9-]+", kind)):
        return address_field(orcpt, international)
    if kind == "utf-8":
        decoded = _EMBEDDED_RE.sub(lambda m: codepoint(m.group(1)), address)
        if decoded.isascii():
            return f"utf-8; {utf8_addr(decoded, False)}"
        return address_field(decoded, international)
    if kind == "rfc822":
        return address_field(address, international)
    return f"{kind}; {field_text(address, international)}"


def codepoint(hexpoint: str) -> str:
    value = int(hexpoint, 16)
    return chr(value) if 0 < value <= 0x10FFFF and not 0xD800 <= value <= 0xDFFF else "\ufffd"


# -- bytes


def crlf(data: bytes) -> bytes:
    """Every line ending as CRLF (bare LF and bare CR too)."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def strip_final_crlf(data: bytes) -> bytes:
    return data[:-2] if data.endswith(b"\r\n") else data


def header_section(message: bytes) -> bytes:
    """The header lines of a CRLF message, each ending in CRLF (no blank separator line)."""
    if message.startswith(b"\r\n"):
        return b""
    head, sep, _ = message.partition(b"\r\n\r\n")
    return head + b"\r\n" if sep else (message if message.endswith(b"\r\n") else message + b"\r\n")


def lines_ok(data: bytes) -> bool:
    return b"\x00" not in data and all(len(line) <= MAX_LINE for line in data.split(b"\r\n"))


def seven_bit_clean(data: bytes) -> bool:
    return data.isascii() and lines_ok(data)


def quoted_printable(data: bytes) -> bytes:
    """Quoted-printable of CRLF text (RFC 2045 §6.7), lines kept as lines, CRLF endings."""
    text = data.replace(b"\r\n", b"\n")
    return crlf(quopri.encodestring(text, quotetabs=False))
