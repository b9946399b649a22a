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
        quoted = False
        i = 1
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


def parse_mail_params(items: list[str]) -> MailParams:
    size = body = ret = envid = None
    smtputf8 = False
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
        elif key == "AUTH":
            if value is None:
                raise ArgError(replies.BAD_PARAM_VALUE)
            # RFC 4954 §5: we do not trust other hosts' AUTH= assertions; accepted and ignored.
        else:
            raise ArgError(replies.PARAM_NOT_RECOGNIZED)
    return MailParams(size=size, body_8bit=body == "8BITMIME", smtputf8=smtputf8, ret=ret, envid=envid)


@dataclass(frozen=True, slots=True)
class RcptParams:
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


def parse_rcpt_params(items: list[str]) -> RcptParams:
    notify: tuple[str, ...] = ()
    orcpt: str | None = None
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
            addr_type, semi, xtext = (value or "").partition(";")
            if (
                value is None
                or len(value) > MAX_ORCPT
                or not semi
                or not addr_type
                or not all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in addr_type)
                or not xtext
            ):
                raise ArgError(replies.BAD_PARAM_VALUE)
            try:
                orcpt = f"{addr_type};{xtext_decode(xtext)}"
            except ValueError:
                raise ArgError(replies.BAD_PARAM_VALUE) from None
        else:
            raise ArgError(replies.PARAM_NOT_RECOGNIZED)
    return RcptParams(notify=notify, orcpt=orcpt)
