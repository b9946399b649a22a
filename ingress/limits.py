"""The session's size limits, each with its RFC arithmetic."""

from __future__ import annotations

__all__ = [
    "MAX_AUTH_LINE",
    "MAX_BUFFERED_LINE",
    "MAX_BUFFER_WHILE_WAITING",
    "MAX_COMMAND_LINE",
    "MAX_ENVID",
    "MAX_MAIL_LINE",
    "MAX_ORCPT",
    "MAX_RCPT_LINE",
    "MAX_TEXT_LINE",
    "line_limit",
]

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, verb and CRLF included.
MAX_COMMAND_LINE = 512
# MAIL grows by what each advertised extension adds to it: " SIZE=" + 20 digits = 26 (RFC 1870 §3),
# " BODY=8BITMIME" = 14 (RFC 6152), " SMTPUTF8" = 9 (RFC 6531), " RET=HDRS" = 9 and
# " ENVID=" + 100 = 107 (RFC 3461 §4.3/§4.4), " AUTH=" + 500 = 506 (RFC 4954 §5).
MAX_MAIL_LINE = MAX_COMMAND_LINE + 26 + 14 + 9 + 9 + 107 + 506
# RCPT grows by " NOTIFY=SUCCESS,FAILURE,DELAY" = 29 and " ORCPT=" + 500 = 507 (RFC 3461 §4.1/§4.2).
MAX_RCPT_LINE = MAX_COMMAND_LINE + 29 + 507
# RFC 4954 §4: an AUTH command line or SASL response line may be up to 12288 octets.
MAX_AUTH_LINE = 12288
# A partial command line (no LF yet) longer than every limit above is discarded as it arrives.
MAX_BUFFERED_LINE = max(MAX_COMMAND_LINE, MAX_MAIL_LINE, MAX_RCPT_LINE, MAX_AUTH_LINE)
# RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF, i.e. 998 of content. It is
# measured after dot-unstuffing, so on the wire a stuffed line may be 1001 octets (as aiosmtpd).
MAX_TEXT_LINE = 1000
# RFC 3461 §4.4: ENVID is at most 100 characters; §4.2: ORCPT at most 500.
MAX_ENVID = 100
MAX_ORCPT = 500
# Input pipelined (RFC 2920) while a Transaction/Authenticate is outstanding. A client cannot send
# a message body before our 354, so legitimate input here is a group of commands: at most
# max_recipients RCPT lines of MAX_RCPT_LINE octets, ~1 MiB for Postfix's default of 1000. Beyond
# this the session answers the outstanding event, then 421 4.7.0 and closes.
MAX_BUFFER_WHILE_WAITING = 1 << 20

_LINE_LIMIT = {b"MAIL": MAX_MAIL_LINE, b"RCPT": MAX_RCPT_LINE, b"AUTH": MAX_AUTH_LINE}


def line_limit(line: bytes) -> int:
    """The longest this command line may be, CRLF included, by its verb."""
    return _LINE_LIMIT.get(line[:4].upper(), MAX_COMMAND_LINE)
