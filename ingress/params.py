"""MAIL and RCPT arguments: the path and the ESMTP parameters (RFC 5321 §4.1.2 esmtp-param) of
SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8 (RFC 6531), RET/ENVID/NOTIFY/ORCPT (RFC 3461) and
AUTH (RFC 4954 §5). Pure functions; a bad argument raises ``ArgError`` with the reply to send.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingress import replies
from ingress.limits import MAX_ENVID, MAX_ORCPT
from ingress.replies import Reply

__all__ = [
    "ArgError",
    "MailParams",
    "RcptParams",
    "decode_orcpt",
    "esmtp_params",
    "parse_mail_params",
    "parse_rcpt_params",
    "split_path",
    "xtext_decode",
]


class ArgError(Exception):
    """A command's argument is unacceptable; ``reply`` is what to answer."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def xtext_decode(value: str) -> str:
    """RFC 3461 §4: xtext = *( xchar / "+" 2HEXCHAR ), xchar = "!".."~" except "+" and "=".
    The decoded value must be printable ASCII (it ends up in DSN headers). Raises ValueError."""
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            digits = value[i + 1 : i + 3]
            if len(digits) != 2 or any(d not in "0123456789ABCDEFabcdef" for d in digits):
                raise ValueError("bad xtext escape")
            ch = chr(int(digits, 16))
            i += 3
        elif "!" <= ch <= "~" and ch != "=":
            i += 1
        else:
            raise ValueError("bad xtext character")
        if not " " <= ch <= "~":
            raise ValueError("non-printable xtext value")
        out.append(ch)
    return "".join(out)


def split_path(arg: str, keyword: str) -> tuple[str, list[str]]:
    """``FROM:<path> params`` -> (``<path>``, params). A space after the colon is tolerated."""
    if arg[: len(keyword)].upper() != keyword:
        raise ArgError(replies.SYNTAX_ERROR_ARGS)
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest:
        raise ArgError(replies.SYNTAX_ERROR_ARGS)
    if rest.startswith("<"):
        # the path ends at the first ">" outside a quoted local part; without a quote (nearly
        # every client) that is the first ">", found without stepping through the characters
        quoted = False
        i = 1 if '"' in rest else rest.find(">") if ">" in rest else len(rest)
        while i < len(rest):
            ch = rest[i]
            if quoted:
                if ch == "\\":
                    i += 1
                elif ch == '"':
                    quoted = False
            elif ch == '"':
                quoted = True
            elif ch == ">":
                break
            i += 1
        else:
            raise ArgError(replies.BAD_ADDRESS)
        path, tail = rest[: i + 1], rest[i + 1 :]
        if tail and not tail.startswith(" "):
            raise ArgError(replies.SYNTAX_ERROR_ARGS)
    else:
        path, _, tail = rest.partition(" ")
    return path, tail.split(" ") if tail.strip(" ") else []


def esmtp_params(items: list[str]) -> dict[str, str | None]:
    """ESMTP parameters (RFC 5321 §4.1.2 esmtp-param); keywords upper-cased; duplicates 501."""
    out: dict[str, str | None] = {}
    for item in items:
        if not item:
            continue  # several spaces between parameters
        key, eq, value = item.partition("=")
        key = key.upper()
        if not key or (eq and not value):
            raise ArgError(replies.BAD_PARAM_VALUE)
        if key in out:
            raise ArgError(replies.BAD_PARAM_VALUE)
        out[key] = value if eq else None
    return out


@dataclass(frozen=True, slots=True)
class MailParams:
    size: int | None = None
    body_8bit: bool = False
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    requiretls: bool = False  # RFC 8689


def parse_mail_params(items: list[str]) -> MailParams:
    size = body = ret = envid = None
    smtputf8 = requiretls = False
    for key, value in esmtp_params(items).items():
        if key == "SIZE":
            if value is None or not value.isascii() or not value.isdigit() or len(value) > 20:
                raise ArgError(replies.BAD_PARAM_VALUE)
            size = int(value)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise ArgError(replies.BAD_PARAM_VALUE)
            body = value.upper()
        elif key == "SMTPUTF8":
            if value is not None:
                raise ArgError(replies.BAD_PARAM_VALUE)
            smtputf8 = True
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise ArgError(replies.BAD_PARAM_VALUE)
            ret = value.upper()
        elif key == "ENVID":
            if value is None or len(value) > MAX_ENVID:
                raise ArgError(replies.BAD_PARAM_VALUE)
            try:
                envid = xtext_decode(value)
            except ValueError:
                raise ArgError(replies.BAD_PARAM_VALUE) from None
        elif key == "REQUIRETLS":
            if value is not None:
                raise ArgError(replies.BAD_PARAM_VALUE)
            requiretls = True
        elif key == "AUTH":
            if value is None:
                raise ArgError(replies.BAD_PARAM_VALUE)
            # RFC 4954 §5: we do not trust other hosts' AUTH= assertions; accepted and ignored.
        else:
            raise ArgError(replies.PARAM_NOT_RECOGNIZED)
    return MailParams(
        size=size, body_8bit=body == "8BITMIME", smtputf8=smtputf8, ret=ret, envid=envid, requiretls=requiretls
    )


@dataclass(frozen=True, slots=True)
class RcptParams:
    notify: tuple[str, ...] = ()
    orcpt: str | None = None
    # An ORCPT that could not be read is dropped, the recipient kept (a lost Original-Recipient
    # costs less than refused mail): why, for the log. Never the value itself.
    orcpt_dropped: str | None = None


def parse_rcpt_params(items: list[str], *, smtputf8: bool = False) -> RcptParams:
    notify: tuple[str, ...] = ()
    orcpt: str | None = None
    dropped: str | None = None
    for key, value in esmtp_params(items).items():
        if key == "NOTIFY":
            kinds = (value or "").upper().split(",")
            valid = kinds == ["NEVER"] or (
                set(kinds) <= {"SUCCESS", "FAILURE", "DELAY"} and len(set(kinds)) == len(kinds)
            )
            if value is None or not valid:
                raise ArgError(replies.BAD_PARAM_VALUE)
            notify = tuple(kinds)
        elif key == "ORCPT":
            try:
                orcpt = decode_orcpt(value, smtputf8=smtputf8)
            except ValueError as e:
                dropped = str(e)
        else:
            raise ArgError(replies.PARAM_NOT_RECOGNIZED)
    return RcptParams(notify=notify, orcpt=orcpt, orcpt_dropped=dropped)


_HEX = frozenset("0123456789ABCDEFabcdef")


def _unplus(raw: bytes) -> bytes:
    """xtext's ``+XX`` escapes (RFC 3461 §4) decoded to octets; other octets as they are."""
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x2B:  # "+"
            digits = raw[i + 1 : i + 3].decode("ascii", "replace")
            if len(digits) != 2 or not set(digits) <= _HEX:
                raise ValueError("bad xtext escape")
            out.append(int(digits, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def _unembed(text: str) -> str:
    """RFC 6533 §3 EmbeddedUnicodeChar: ``\\x{HEXPOINT}`` is that code point."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("\\x{", i):
            end = text.find("}", i + 3)
            digits = text[i + 3 : end] if end > 0 else ""
            if not 2 <= len(digits) <= 6 or not set(digits) <= _HEX or int(digits, 16) > 0x10FFFF:
                raise ValueError("bad \\x{} escape")
            out.append(chr(int(digits, 16)))
            i = end + 1
        elif text[i] == "\\":
            raise ValueError("stray backslash")
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def decode_orcpt(value: str | None, *, smtputf8: bool) -> str:
    """RFC 3461 §4.2 ORCPT ``addr-type;xtext``, read liberally: returns ``addr-type;address``
    decoded. An Internet mail address comes as ``rfc822`` in xtext (Postfix escapes the octets of
    a UTF-8 address: ``rfc822;j+C3+B6rg@x``) or as RFC 6533 ``utf-8`` (``\\x{F6}`` escapes, or raw
    UTF-8 under SMTPUTF8: ``utf-8;jörg@x``); both are kept as ``rfc822;<the address>``, which
    the DSN writes back as utf-8 when it is not ASCII. Raises ValueError saying what is wrong."""
    if value is None:
        raise ValueError("no value")
    if len(value.encode("utf-8")) > MAX_ORCPT:
        raise ValueError(f"longer than {MAX_ORCPT} octets")
    addr_type, semi, encoded = value.partition(";")
    if not semi or not addr_type or not all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in addr_type):
        raise ValueError("no address type")
    if not encoded:
        raise ValueError("empty address")
    if not encoded.isascii() and not smtputf8:
        raise ValueError("UTF-8 without SMTPUTF8")
    kind = addr_type.lower()
    if kind not in ("rfc822", "utf-8"):
        return f"{addr_type};{xtext_decode(encoded)}"  # another kind of address: printable ASCII
    if any(not ("!" <= ch <= "~") for ch in encoded if ch.isascii()):
        raise ValueError("space or control character")
    if kind == "utf-8":
        address = _unembed(encoded)  # RFC 6533 has no "+" escapes: a "+" is taken as it is
    else:
        try:
            address = _unplus(encoded.encode("utf-8")).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("xtext escapes that are not UTF-8") from None
    if any(not ch.isprintable() for ch in address):
        raise ValueError("non-printable character")
    return f"rfc822;{address}"
