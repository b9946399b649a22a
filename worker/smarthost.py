"""Smarthost credentials (``relayhost_auth_file``): who we log in as at the relayhost, and how we
make sure nobody else hears the password.

The file holds one line, ``username password`` or ``username:password`` (``#`` comments). With it
every connection to the relayhost (``[smtp.example.net]:587`` as written in ``relayhost``; a
transport_table route to that same host and port too) must start TLS with a certificate valid for
the relayhost's name under the system CAs, or ``tls_ca_file`` when set, before AUTH PLAIN or LOGIN
(common/smtp/client.py) is sent; otherwise the attempt defers and says why, and no credential is
ever written to the socket. A refused login (535) defers too (our configuration, not the
recipient's fault) and is logged once per relayhost until a login succeeds again, not per message.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from common.settings import Settings
from common.smtp.hostport import parse_hostport

__all__ = ["AuthLog", "Smarthost", "SmarthostError", "parse_credentials", "smarthost_from_settings"]

log = logging.getLogger("mtaq.worker")


class SmarthostError(Exception):
    """A relayhost_auth_file or tls_ca_file that cannot be used: one line for the operator."""


def parse_credentials(text: str, where: str) -> tuple[str, str]:
    """(username, password) from the file's one entry; SmarthostError (never quoting it) otherwise."""
    lines = [raw.strip() for raw in text.splitlines() if raw.strip() and not raw.strip().startswith("#")]
    if len(lines) != 1:
        raise SmarthostError(f"relayhost_auth_file {where}: expected one line `username password`")
    line = lines[0]
    # user:password when the first word has a colon (a password may hold spaces), else user password
    first = line.split()[0]
    if ":" in first:
        user, sep, password = line.partition(":")
    else:
        user, sep, password = first, " ", line[len(first) :]
    user, password = user.strip(), password.strip()
    if not sep or not user or not password:
        raise SmarthostError(f"relayhost_auth_file {where}: expected `username password` or `username:password`")
    return user, password


@dataclass(frozen=True)
class Smarthost:
    host: str  # the relayhost's name: what its certificate must be valid for
    port: int
    credentials: tuple[str, str] = field(repr=False)
    tls: ssl.SSLContext = field(repr=False)  # verifying: CERT_REQUIRED, check_hostname

    def applies(self, hostname: str, port: int) -> bool:
        return hostname.lower().rstrip(".") == self.host and port == self.port


def smarthost_from_settings(settings: Settings) -> Smarthost | None:
    """The relayhost's login, or None without ``relayhost_auth_file``; SmarthostError when the
    files cannot be used or there is no relayhost to log in to."""
    if not settings.relayhost_auth_file:
        return None
    if not settings.relayhost:
        raise SmarthostError("relayhost_auth_file is set but relayhost is not: whose login is it?")
    path = Path(settings.relayhost_auth_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SmarthostError(f"relayhost_auth_file {path}: {reason}") from None
    host, port = parse_hostport(settings.relayhost, settings.smtp_port)
    try:
        ctx = ssl.create_default_context(cafile=settings.tls_ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise SmarthostError(f"tls_ca_file {settings.tls_ca_file}: {getattr(e, 'strerror', None) or e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return Smarthost(host.lower().rstrip("."), port, parse_credentials(text, str(path)), ctx)


class AuthLog:
    """Login failures logged once per relayhost (a WARNING), until a login there succeeds again;
    the repeats go to DEBUG. Shared by the conversations of one worker."""

    def __init__(self) -> None:
        self._failing: set[str] = set()
        self._lock = threading.Lock()

    def failed(self, relay: str, text: str) -> None:
        with self._lock:
            first = relay not in self._failing
            self._failing.add(relay)
        if first:
            log.warning("%s (mail to it is deferred; check relayhost_auth_file and tls_ca_file)", text)
        else:
            log.debug("%s", text)

    def succeeded(self, relay: str) -> None:
        with self._lock:
            again = relay in self._failing
            self._failing.discard(relay)
        if again:
            log.info("%s: login succeeded again", relay)
