"""The ``Received:`` trace header the ingress prepends to every message (RFC 5321 §4.4).

Shape (RFC 5321 §4.4 Stamp, RFC 5322 §3.6.7 folding with CRLF + TAB):

    Received: from helo (name [ip])
    \tby hostname (mtaq) with ESMTPS id QID
    \tfor <rcpt>; Sun, 29 Nov 2026 21:41:13 +0000

The HELO name is the client's word and may be anything; it is reduced to printable characters so
that it can neither fold nor end the header, nor open/close a comment.
"""

from __future__ import annotations

import functools
import ipaddress

from common.dates import format_date

__all__ = ["received_header", "tcp_info"]

# RFC 5322 §2.1.1: a header line SHOULD stay within 78 characters; a HELO beyond this is cut.
MAX_HELO_IN_HEADER = 64


def _clean(text: str, *, limit: int = MAX_HELO_IN_HEADER) -> str:
    """Printable, no whitespace, no parentheses/backslash (comment syntax), at most ``limit`` chars."""
    # the common case in one C-speed look (of the printable characters only SP is whitespace)
    if text.isprintable() and " " not in text and "(" not in text and ")" not in text and "\\" not in text:
        return text[:limit] or "unknown"
    out = "".join(ch if (ch.isprintable() and not ch.isspace() and ch not in "()\\") else "?" for ch in text)
    return out[:limit] or "unknown"


@functools.lru_cache(maxsize=1024)  # for each message; clients come back (pure function)
def tcp_info(client_name: str, client_ip: str) -> str:
    """RFC 5321 §4.4 TCP-info: ``name [ip]`` with ``[IPv6:...]`` for IPv6 (RFC 5321 §4.1.3)."""
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        literal = f"[{_clean(client_ip)}]"
    else:
        literal = f"[IPv6:{addr.compressed}]" if addr.version == 6 else f"[{addr.compressed}]"
    return f"{_clean(client_name or 'unknown')} {literal}"


def received_header(
    *,
    hostname: str,
    helo: str,
    client_ip: str,
    client_name: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    when: float,
) -> bytes:
    """The complete header, folded, ending in CRLF. ``recipient`` is named only when the message has
    exactly one (RFC 5321 §7.2: naming one of many discloses Bcc recipients)."""
    date = format_date(when)
    lines = [
        f"Received: from {_clean(helo)} ({tcp_info(client_name, client_ip)})",
        f"\tby {_clean(hostname, limit=255)} (mtaq) with {_clean(protocol)} id {_clean(queue_id)}",
    ]
    if recipient is not None:
        lines.append(f"\tfor <{_clean(recipient, limit=256)}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
