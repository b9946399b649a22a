"""A raw SMTP client for live ingress tests: bytes on a real socket, every reply parsed and checked
against the reply grammar of RFC 5321 §4.2, and a swaks-style transcript of the whole dialogue.

    with Wire(port) as w:
        assert w.reply().code == 220
        assert w.cmd("EHLO client.test").code == 250
        assert w.cmd("RCPT TO:<x@y>").status == (503, "5.5.1")

Transcript marks (as swaks prints them): ``<-`` server and `` ->`` client in clear text, ``<~`` and
`` ~>`` under TLS.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import trustme

from tests.integration.eventually import GENEROUS

__all__ = ["REPLY_LINE", "Reply", "TLSFiles", "Wire", "WireClosed", "check_reply_lines", "make_tls_files"]

# RFC 5321 §4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF ) Reply-code [ SP textstring ] CRLF,
# Reply-code = %x32-35 %x30-35 %x30-39, textstring = 1*(%d09 / %d32-126). (An empty text after the
# separator is allowed: "334 " is the empty SASL challenge of RFC 4954 §4.)
REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])([ -])([\t\x20-\x7e]*)\r\n")
ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")
MAX_REPLY_LINE = 4096  # nothing we send is longer: a safety bound for the reader


class WireClosed(Exception):
    """The server closed the connection (EOF or reset) while a reply was expected."""


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]  # the text of every line, without code and separator

    @property
    def enhanced(self) -> str:
        """The RFC 3463 code at the start of the last line, or ""."""
        first = self.lines[-1].split(" ", 1)[0] if self.lines else ""
        return first if ENHANCED.fullmatch(first) else ""

    @property
    def status(self) -> tuple[int, str]:
        return (self.code, self.enhanced)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return " | ".join(f"{self.code} {line}" for line in self.lines)


def check_reply_lines(data: bytes) -> list[Reply]:
    """Split server output into replies; AssertionError if any line breaks the grammar, if the
    lines of one reply disagree on the code, if an enhanced code's class differs from the reply's, or
    if the output ends inside a line or inside a multi-line reply."""
    out: list[Reply] = []
    pending: list[str] = []
    code = None
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        assert end >= 0, f"output ends inside a line: {data[pos:]!r}"
        raw = data[pos : end + 2]
        m = REPLY_LINE.fullmatch(raw)
        assert m is not None, f"not an SMTP reply line: {raw!r}"
        this = int(m.group(1))
        assert code is None or this == code, f"multi-line reply changes code: {raw!r}"
        text = m.group(3).decode("ascii")
        enh = ENHANCED.fullmatch(text.split(" ", 1)[0])
        assert enh is None or enh.group(1) == str(this)[0], f"enhanced code of another class: {raw!r}"
        pending.append(text)
        code = this
        if m.group(2) == b" ":
            out.append(Reply(this, tuple(pending)))
            pending, code = [], None
        pos = end + 2
    assert not pending, f"output ends inside a multi-line reply: {pending!r}"
    return out


class Wire:
    # Every read waits for a reply the test expects: the bound only matters when it never comes, so it is
    # GENEROUS, not a guess at how fast a loaded machine answers.
    def __init__(
        self, port: int, host: str = "127.0.0.1", *, source: str = "127.0.0.1", timeout: float = GENEROUS
    ) -> None:
        self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
        self.timeout = timeout
        self.buf = b""
        self.tls = False
        self.transcript: list[str] = []

    # -- raw IO
    def _note(self, direction: str, data: bytes) -> None:
        mark = {"S": "<~ " if self.tls else "<- ", "C": " ~> " if self.tls else " -> "}[direction]
        for line in data.split(b"\n"):
            if line:
                self.transcript.append(mark + line.rstrip(b"\r").decode("utf-8", "replace"))

    def send(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self._note("C", raw)
        self.sock.sendall(raw)

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no reply in {self.timeout}s; have {self.buf!r}")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError) as e:
            raise WireClosed(str(e)) from e
        except TimeoutError:
            raise TimeoutError(f"no reply in {self.timeout}s; have {self.buf!r}") from None
        if not chunk:
            raise WireClosed(f"EOF; unparsed {self.buf!r}")
        self.buf += chunk

    def line(self, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\r\n" not in self.buf:
            assert len(self.buf) < MAX_REPLY_LINE, f"reply line too long: {self.buf[:200]!r}"
            self._fill(deadline)
        raw, _, self.buf = self.buf.partition(b"\r\n")
        self._note("S", raw + b"\r\n")
        return raw + b"\r\n"

    def reply(self, timeout: float | None = None) -> Reply:
        """The next complete reply (all lines of a multi-line one), checked against the grammar."""
        lines = []
        while True:
            raw = self.line(timeout)
            lines.append(raw)
            if raw[3:4] != b"-":
                break
        [reply] = check_reply_lines(b"".join(lines))
        return reply

    def cmd(self, line: str | bytes, timeout: float | None = None) -> Reply:
        raw = line.encode() if isinstance(line, str) else line
        self.send(raw + b"\r\n")
        return self.reply(timeout)

    def closed(self, timeout: float = GENEROUS) -> bool:
        """True when the server closes the connection (EOF or reset) within ``timeout``; whatever
        it still sent before is parsed into replies, available from ``self.reply()`` afterwards."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._fill(deadline)
        except WireClosed:
            return True
        except TimeoutError:
            return False

    # -- SMTP steps
    def greet(self, helo: str = "client.test") -> Reply:
        greeting = self.reply()
        assert greeting.code == 220, greeting
        ehlo = self.cmd(f"EHLO {helo}")
        assert ehlo.code == 250, ehlo
        return ehlo

    def starttls(self, context: ssl.SSLContext, server_hostname: str = "mtaq.test") -> None:
        r = self.cmd("STARTTLS")
        assert r.status == (220, "2.0.0"), r
        assert not self.buf, f"server sent more after 220: {self.buf!r}"
        self.sock.settimeout(self.timeout)
        tls_sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        cipher = tls_sock.cipher()
        self.sock = tls_sock
        self.tls = True
        self.transcript.append(f"=== TLS started with cipher {tls_sock.version()}:{cipher[0] if cipher else '?'}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class TLSFiles:
    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def make_tls_files(directory: Path, hostname: str = "mtaq.test") -> TLSFiles:
    """A trustme CA and a server certificate for ``hostname`` and 127.0.0.1, written as PEM files."""
    ca = trustme.CA()
    issued = ca.issue_cert(hostname, "127.0.0.1")
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return TLSFiles(ca, cert, key)
