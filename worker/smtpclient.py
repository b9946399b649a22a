"""One SMTP client connection to a remote MX, with per-recipient results.

Built on smtplib (EHLO/HELO, STARTTLS, MAIL/RCPT/DATA). Opportunistic TLS as Postfix's ``may``
level: STARTTLS when offered, certificates not verified (RFC 7435), and on a failed handshake the
same host is tried again in plain text.
"""

from __future__ import annotations

import re
import smtplib
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ConnectFailed", "ConnectionCache", "RemoteReply", "SMTPConnection", "TransactionResult"]

_ENHANCED = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})\s")


@dataclass(frozen=True, slots=True)
class RemoteReply:
    code: int
    text: str  # the reply text, multi-line joined with spaces, as Postfix logs it

    @classmethod
    def of(cls, code: int, raw: bytes | str) -> RemoteReply:
        b = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
        return cls(code, " ".join(b.decode("utf-8", "replace").split()))

    @property
    def dsn(self) -> str:
        """The enhanced status code the server gave, else one derived from the basic code (RFC 3463)."""
        m = _ENHANCED.match(self.text.encode() + b" ")
        if m and m.group(1).decode() == str(self.code)[0]:
            return b".".join(m.groups()).decode()
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

    @property
    def transient(self) -> bool:
        return not (200 <= self.code < 300 or 500 <= self.code < 600)

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class ConnectFailed(Exception):
    """No usable SMTP session with that host (refused, timeout, bad greeting): try the next one."""

    def __init__(self, text: str, reply: RemoteReply | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.reply = reply


@dataclass(slots=True)
class TransactionResult:
    # recipient position in the list given -> the reply that decided it (RCPT's or DATA's)
    replies: dict[int, RemoteReply]
    # True when the connection broke before every recipient had a reply
    broken: bool = False
    timed_out: bool = False  # ...because the server stopped answering (Postfix: "timed out")


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # opportunistic: an unverified TLS beats plain text
    return ctx


class SMTPConnection:
    def __init__(self, *, helo_name: str, connect_timeout: float, timeout: float) -> None:
        self.helo_name = helo_name
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.smtp: smtplib.SMTP | None = None
        self.tls = False
        self.esmtp = False

    def open(self, ip: str, port: int, *, name: str = "", try_tls: bool = True) -> None:
        """Connect, read the greeting, EHLO (HELO fallback) and STARTTLS when offered."""
        relay = f"{name or ip}[{ip}]:{port}"
        smtp = smtplib.SMTP(timeout=self.connect_timeout, local_hostname=self.helo_name)  # no getfqdn() each time
        try:
            code, banner = smtp.connect(ip, port)
        except (OSError, smtplib.SMTPException) as e:
            smtp.close()
            raise ConnectFailed(f"connect to {relay}: {_reason(e)}") from None
        if smtp.sock is not None:
            smtp.sock.settimeout(self.timeout)
        if code != 220:
            _quit(smtp)
            reply = RemoteReply.of(code, banner)
            raise ConnectFailed(f"host {relay} refused to talk to me: {reply}", reply)
        try:
            self._hello(smtp, relay)
            if try_tls and smtp.has_extn("starttls"):
                # smtplib takes the TLS server name (SNI) from the host given to its constructor,
                # which we leave empty so that connect() reports the greeting itself
                smtp._host = name or ip  # type: ignore[attr-defined]
                try:
                    code, _ = smtp.starttls(context=_tls_context())
                except (ssl.SSLError, OSError, ValueError, smtplib.SMTPException):
                    smtp.close()
                    # handshake failed: Postfix's "may" level delivers in plain text instead
                    return self.open(ip, port, name=name, try_tls=False)
                if code == 220:
                    self.tls = True
                    self._hello(smtp, relay)
        except ConnectFailed:
            smtp.close()
            raise
        except (OSError, smtplib.SMTPException) as e:
            smtp.close()
            raise ConnectFailed(f"lost connection with {relay} during greeting: {_reason(e)}") from None
        self.smtp = smtp

    def _hello(self, smtp: smtplib.SMTP, relay: str) -> None:
        code, resp = smtp.ehlo(self.helo_name)
        self.esmtp = code == 250
        if 400 <= code < 500:
            # RFC 5321 §4.1.4: HELO is the fallback for a server that does not know EHLO (5xx); a
            # 4xx (421: closing) is the server refusing us now, and it has likely hung up already
            reply = RemoteReply.of(code, resp)
            raise ConnectFailed(f"host {relay} refused to talk to me: {reply}", reply)
        if not self.esmtp:
            code, resp = smtp.helo(self.helo_name)
            if code != 250:
                reply = RemoteReply.of(code, resp)
                raise ConnectFailed(f"host {relay} refused HELO: {reply}", reply)

    def supports(self, extension: str) -> bool:
        return self.smtp is not None and self.esmtp and self.smtp.has_extn(extension)

    def send(
        self, sender: str, recipients: Sequence[str], body: bytes, *, mail_options: Sequence[str] = ()
    ) -> TransactionResult:
        """One mail transaction. Every recipient ends with a reply unless the connection broke."""
        assert self.smtp is not None
        # per transaction: a cached connection must not keep UTF-8 from an earlier SMTPUTF8 message
        self.smtp.command_encoding = "utf-8" if "SMTPUTF8" in mail_options else "ascii"
        if self.supports("pipelining"):
            return self._send_pipelined(sender, recipients, body, mail_options)
        smtp = self.smtp
        replies: dict[int, RemoteReply] = {}
        try:
            code, resp = smtp.mail(sender, list(mail_options))
            if code != 250:
                # MAIL refused: that reply decides every recipient of the message
                reply = RemoteReply.of(code, resp)
                self._rset()
                return TransactionResult({i: reply for i in range(len(recipients))})
            accepted: list[int] = []
            for i, rcpt in enumerate(recipients):
                code, resp = smtp.rcpt(rcpt)
                reply = RemoteReply.of(code, resp)
                if 200 <= code < 300:
                    accepted.append(i)
                else:
                    replies[i] = reply
            if not accepted:
                self._rset()
                return TransactionResult(replies)
            data_resp: bytes | str
            try:
                code, data_resp = smtp.data(body)
            except smtplib.SMTPDataError as e:  # DATA itself refused (no 354)
                code, data_resp = e.smtp_code, e.smtp_error
            reply = RemoteReply.of(code, data_resp)
            for i in accepted:
                replies[i] = reply
            if code != 250:
                self._rset()
            return TransactionResult(replies)
        except smtplib.SMTPRecipientsRefused as e:  # pragma: no cover - smtplib.rcpt never raises it
            raise AssertionError(e) from None
        except (OSError, smtplib.SMTPException) as e:
            self.close()
            if any(r.code == 421 for r in replies.values()):
                # the server said 421 and hung up: that reply decides the rest, as in the pipelined case
                closing = next(r for r in replies.values() if r.code == 421)
                for i in range(len(recipients)):
                    replies.setdefault(i, closing)
            return TransactionResult(replies, broken=True, timed_out=_timed_out(e))

    def _send_pipelined(
        self, sender: str, recipients: Sequence[str], body: bytes, mail_options: Sequence[str]
    ) -> TransactionResult:
        """RFC 2920: MAIL, every RCPT and DATA in one write, then their replies in order; two round
        trips a message instead of 3 + recipients."""
        assert self.smtp is not None
        smtp = self.smtp
        opts = "".join(" " + o for o in mail_options)
        lines = [f"MAIL FROM:{smtplib.quoteaddr(sender)}{opts}"]
        lines += [f"RCPT TO:{smtplib.quoteaddr(r)}" for r in recipients]
        lines.append("DATA")
        replies: dict[int, RemoteReply] = {}
        accepted: list[int] = []
        last: RemoteReply | None = None  # the last reply read, to explain a connection that then broke
        try:
            smtp.send("\r\n".join(lines) + "\r\n")
            mail = last = RemoteReply.of(*smtp.getreply())
            if mail.code != 250:
                replies = dict.fromkeys(range(len(recipients)), mail)
            # Each reply is kept as it is read: a server may answer some RCPTs, then say 421 and
            # hang up (Postfix's smtpd_hard_error_limit: "421 4.7.0 Error: too many errors"). The
            # 5xx it gave before are final; losing them would defer those recipients, and with
            # them the good ones sent after them, on every retry until the queue lifetime.
            for i in range(len(recipients)):
                last = RemoteReply.of(*smtp.getreply())
                if mail.code != 250:
                    continue
                if 200 <= last.code < 300:
                    accepted.append(i)
                else:
                    replies[i] = last
            data = last = RemoteReply.of(*smtp.getreply())
            if data.code != 354:
                # a refused DATA decides the accepted recipients (the server had no valid one, or
                # refuses the message); RSET clears whatever the server kept
                for i in accepted:
                    replies[i] = data if mail.code == 250 else mail
                self._rset()
                return TransactionResult(replies)
            if not accepted or mail.code != 250:
                # a server that said 354 without a valid recipient: end the empty message
                smtp.send(b".\r\n")
                smtp.getreply()
                self._rset()
                return TransactionResult(replies)
            smtp.send(_dot_stuff(body))
            final = last = RemoteReply.of(*smtp.getreply())
            for i in accepted:
                replies[i] = final
            if final.code != 250:
                self._rset()
            return TransactionResult(replies)
        except (OSError, smtplib.SMTPException) as e:
            self.close()
            if last is not None and last.code == 421:
                # the server said why it closed (RFC 5321 §3.8): that reply, not "lost connection",
                # decides what is left, as Postfix reports it
                for i in range(len(recipients)):
                    replies.setdefault(i, last)
            return TransactionResult(replies, broken=True, timed_out=_timed_out(e))

    def _rset(self) -> None:
        assert self.smtp is not None
        try:
            self.smtp.rset()
        except (OSError, smtplib.SMTPException):
            self.close()

    def noop(self) -> bool:
        if self.smtp is None:
            return False
        try:
            code, _ = self.smtp.noop()
        except (OSError, smtplib.SMTPException):
            self.close()
            return False
        if code != 250:
            self.quit()
        return code == 250

    @property
    def alive(self) -> bool:
        return self.smtp is not None

    def quit(self) -> None:
        if self.smtp is not None:
            _quit(self.smtp)
            self.smtp = None

    def close(self) -> None:
        if self.smtp is not None:
            self.smtp.close()
            self.smtp = None


def _dot_stuff(body: bytes) -> bytes:
    """RFC 5321 §4.5.2: a line starting with '.' gets another; the data ends with CRLF.CRLF."""
    stuffed = _LEADING_DOT.sub(b"..", body)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


_LEADING_DOT = re.compile(rb"(?m)^\.")


class ConnectionCache:
    """Idle connections kept between jobs, one per remote address, as Postfix's scache does
    (smtp_connection_cache_time_limit). A NOOP proves one still lives before it is reused."""

    def __init__(self, idle_limit: float = 5.0) -> None:
        self.idle_limit = idle_limit
        self._idle: dict[tuple[str, int], tuple[SMTPConnection, float]] = {}

    def take(self, ip: str, port: int) -> SMTPConnection | None:
        self.sweep()
        hit = self._idle.pop((ip, port), None)
        if hit is None:
            return None
        conn = hit[0]
        return conn if conn.noop() else None

    def give(self, ip: str, port: int, conn: SMTPConnection) -> None:
        if not conn.alive:
            return
        old = self._idle.pop((ip, port), None)
        if old is not None:
            old[0].quit()
        self._idle[(ip, port)] = (conn, time.monotonic())

    def sweep(self) -> None:
        now = time.monotonic()
        for key, (conn, since) in list(self._idle.items()):
            if now - since > self.idle_limit:
                del self._idle[key]
                conn.quit()


def _quit(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()


def _timed_out(e: BaseException) -> bool:
    # smtplib turns a read timeout into SMTPServerDisconnected, with the TimeoutError as its context
    return isinstance(e, TimeoutError) or isinstance(e.__context__, TimeoutError)


def _reason(e: BaseException) -> str:
    if _timed_out(e):
        return "Connection timed out"
    if isinstance(e, ConnectionRefusedError):
        return "Connection refused"
    if isinstance(e, smtplib.SMTPServerDisconnected):
        return "Connection closed by remote host"
    return str(e) or type(e).__name__
