"""The catalogue of every reply the ingress sends, with RFC 3463 enhanced status codes.

A ``Reply`` (common/smtp/reply.py, the type the SMTP client reads servers' replies into too) is a
(code, enhanced, text) triple. RFC 2034 §3 asks for the enhanced code on every
2xx/4xx/5xx reply line *except* the initial greeting and the replies to HELO/EHLO; 3xx replies
(354, 334) cannot carry one either, since RFC 3463 classes are only 2, 4 and 5. Those few replies
have ``enhanced == ""``; every other reply in this module carries one. (Putting ``2.0.0`` before
the EHLO keywords would also break clients such as Python's smtplib, which read the first word of
each EHLO line as an extension keyword.)

Reply texts never contain client input: nothing a client sends is echoed back.
"""

from __future__ import annotations

from common.smtp.reply import Reply

__all__ = [
    "AUTH_ALREADY",
    "AUTH_BAD_BASE64",
    "AUTH_CANCELLED",
    "AUTH_CONTINUE",
    "AUTH_FAILED",
    "AUTH_MECHANISM_UNKNOWN",
    "AUTH_NOT_AVAILABLE",
    "AUTH_OK",
    "AUTH_RATE_LIMITED",
    "AUTH_TEMP_FAILURE",
    "BAD_ADDRESS",
    "BAD_PARAM_VALUE",
    "BAD_SEQUENCE",
    "BARE_NEWLINE",
    "BYE",
    "DATA_START",
    "ENCRYPTION_REQUIRED_FOR_AUTH",
    "EXPN_DISABLED",
    "HELP",
    "INSUFFICIENT_STORAGE",
    "INVALID_CHARACTER",
    "LINE_TOO_LONG",
    "LOGIN_PASSWORD",
    "LOGIN_USERNAME",
    "LOOPING_RECIPIENT",
    "MESSAGE_TOO_BIG",
    "MUST_STARTTLS",
    "NON_ASCII_ADDRESS",
    "NULL_MX_RECIPIENT",
    "NUL_IN_MESSAGE",
    "OK",
    "PARAM_NOT_RECOGNIZED",
    "RECIPIENT_OK",
    "RECIPIENT_TABLE_UNAVAILABLE",
    "RELAY_DENIED",
    "REQUIRETLS_NEEDS_TLS",
    "RESET_OK",
    "SENDER_OK",
    "SHUTTING_DOWN",
    "STARTTLS_READY",
    "STORAGE_FAILED",
    "SYNTAX_ERROR_ARGS",
    "TIMEOUT",
    "TLS_ALREADY_ACTIVE",
    "TLS_NOT_AVAILABLE",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_ERRORS",
    "TOO_MANY_RECIPIENTS",
    "UNDELIVERABLE_RECIPIENT",
    "UNKNOWN_DOMAIN_RECIPIENT",
    "UNKNOWN_RELAY_RECIPIENT",
    "UNRECOGNIZED",
    "UNROUTABLE_RECIPIENT",
    "UNVERIFIED_RECIPIENT",
    "VRFY_CANNOT",
    "Reply",
    "ehlo_reply",
    "greeting",
    "helo_reply",
    "queued",
]


# -- positive completions
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
RESET_OK = Reply(250, "2.0.0", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
HELP = Reply(214, "2.0.0", "See https://www.rfc-editor.org/rfc/rfc5321")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
STARTTLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

# -- intermediate (3xx: no enhanced code exists for this class)
DATA_START = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
AUTH_CONTINUE = Reply(334, "", "")  # "334 " : send the PLAIN initial response now (RFC 4954 §4)
LOGIN_USERNAME = Reply(334, "", "VXNlcm5hbWU6")  # base64("Username:")
LOGIN_PASSWORD = Reply(334, "", "UGFzc3dvcmQ6")  # base64("Password:")

# -- transient failures
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Error: too many connections")
STORAGE_FAILED = Reply(451, "4.3.0", "Error: queue file write error")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available due to temporary reason")

# -- permanent failures: syntax
UNRECOGNIZED = Reply(500, "5.5.1", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
INVALID_CHARACTER = Reply(500, "5.5.2", "Error: invalid character in command")
SYNTAX_ERROR_ARGS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_PARAM_VALUE = Reply(501, "5.5.4", "Error: bad parameter value")
PARAM_NOT_RECOGNIZED = Reply(555, "5.5.4", "Error: parameter not recognized")
BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Error: non-ASCII address requires SMTPUTF8")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
EXPN_DISABLED = Reply(502, "5.5.1", "Error: EXPN not supported")

# -- permanent failures: policy and content
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
# RFC 8689 §4.1: REQUIRETLS is taken only over TLS (and advertised only there)
REQUIRETLS_NEEDS_TLS = Reply(530, "5.7.10", "REQUIRETLS needs a TLS session: issue STARTTLS first")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
BARE_NEWLINE = Reply(550, "5.6.0", "Error: message contains bare CR or LF")
NUL_IN_MESSAGE = Reply(554, "5.6.0", "Error: message contains NUL characters")

# -- relay recipients (Postfix relay_recipient_maps, reject_unverified_recipient)
UNKNOWN_RELAY_RECIPIENT = Reply(550, "5.1.1", "Recipient address rejected: User unknown in relay recipient table")
RECIPIENT_TABLE_UNAVAILABLE = Reply(451, "4.3.0", "Error: recipient table unavailable, try again later")
UNDELIVERABLE_RECIPIENT = Reply(550, "5.1.1", "Recipient address rejected: undeliverable address")
UNVERIFIED_RECIPIENT = Reply(450, "4.1.1", "Recipient address rejected: unverified address, try again later")
# ...refused by DNS as the workers would bounce it (common/mx.py), with the workers' status
NULL_MX_RECIPIENT = Reply(550, "5.1.10", "Recipient address rejected: domain does not accept mail (null MX)")
UNKNOWN_DOMAIN_RECIPIENT = Reply(550, "5.1.2", "Recipient address rejected: domain not found")
UNROUTABLE_RECIPIENT = Reply(550, "5.4.4", "Recipient address rejected: unable to route to the domain's mail servers")
LOOPING_RECIPIENT = Reply(550, "5.4.6", "Recipient address rejected: mail for the domain loops back to myself")

# -- AUTH (RFC 4954 §6)
ENCRYPTION_REQUIRED_FOR_AUTH = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_NOT_AVAILABLE = Reply(502, "5.5.1", "Error: authentication not enabled")
AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_ALREADY = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_TEMP_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
# Too many failed attempts from this address lately (the limiter in auth.py): temporary, and said
# plainly, so that a user behind the same address as a guesser is not told the password is wrong.
AUTH_RATE_LIMITED = Reply(454, "4.7.0", "Error: too many failed authentication attempts, try again later")


def greeting(hostname: str) -> Reply:
    """The 220 banner: no enhanced code (RFC 2034 §3)."""
    return Reply(220, "", f"{hostname} ESMTP mtaq")


def helo_reply(hostname: str) -> Reply:
    """The reply to HELO: no enhanced code (RFC 2034 §3)."""
    return Reply(250, "", hostname)


def ehlo_reply(hostname: str, keywords: list[str]) -> Reply:
    """The multi-line reply to EHLO (RFC 5321 §4.1.1.1): no enhanced codes (RFC 2034 §3)."""
    return Reply(250, "", "\n".join([hostname, *keywords]))


def queued(queue_id: str) -> Reply:
    """The answer to a stored message: ``250 2.0.0 Ok: queued as <ID>``."""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
