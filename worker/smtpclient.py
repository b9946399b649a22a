"""The blocking driver of the sans-IO SMTP client (common/smtp/client.py): a socket, timeouts and
the TLS wrap, nothing else. Every decision about what a reply means is the state machine's.

Opportunistic TLS as Postfix's ``may`` level: STARTTLS when offered, certificates not verified
(RFC 7435), the MX host name as the TLS server name (SNI), and on a failed handshake the same host
is tried again in plain text. Where a policy (MTA-STS, DANE: worker/tlspolicy.py) applies, ``open``
takes its ``Requirement``: STARTTLS is then mandatory and the chain the server sent must pass the
policy's ``check``, else ``TLSPolicyFailed`` (in ``testing`` mode the failure is only noted).
With a smarthost's credentials (``open(auth=..., verify=...)``) TLS is required and verified for
the relayhost's name (Postfix's ``secure``; tls_ca_file or the system CAs): a failed handshake or
an invalid certificate ends the attempt, and the credentials are never sent.
One driver runs in one thread; a worker runs many (worker/pool.py).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence

from common.smtp.client import (
    Client,
    ClientEvent,
    Closed,
    NeedTLS,
    Ready,
    Refused,
    TransactionDone,
    TransactionResult,
)
from common.smtp.reply import Reply
from worker.tlspolicy import OPPORTUNISTIC, Failure, Requirement, TLSUsed

__all__ = [
    "ConnectFailed",
    "ConnectionCache",
    "SMTPConnection",
    "TLSPolicyFailed",
    "TransactionResult",
]

READ_SIZE = 65536


class ConnectFailed(Exception):
    """No usable SMTP session with that host (refused, timeout, bad greeting): try the next one."""

    def __init__(self, text: str, reply: Reply | None = None, *, auth: bool = False, dsn: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.reply = reply
        self.auth = auth  # a smarthost login failed or could not be attempted safely
        self.dsn = dsn  # the status to defer with when no reply says it


class TLSPolicyFailed(ConnectFailed):
    """The host does not meet the TLS policy that applies to it: skip it, never send in plain text."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.text)
        self.failure = failure


# a policy's verdict on the chain the server sent (DER, leaf first) for the MX host name
Checker = Callable[[Requirement, str, list[bytes]], Failure | None]


def _tls_context() -> ssl.SSLContext:
    # create_default_context's protocol, options and ciphers, without its CA store: nothing is
    # verified here (policies check the chain themselves, the smarthost has its own context), and
    # loading the system's CAs cost every worker start 25 ms of CPU
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # opportunistic: an unverified TLS beats plain text
    return ctx


_TLS = _tls_context()


class SMTPConnection:
    def __init__(self, *, helo_name: str, connect_timeout: float, timeout: float) -> None:
        self.helo_name = helo_name
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.client: Client | None = None
        self.tls_used = TLSUsed()
        self.tls_failure: Failure | None = None  # a policy failure noted in testing mode (TLS-RPT)

    @property
    def tls(self) -> bool:
        return self.client is not None and self.client.tls

    @property
    def esmtp(self) -> bool:
        return self.client is not None and self.client.esmtp

    def open(
        self,
        ip: str,
        port: int,
        *,
        name: str = "",
        try_tls: bool = True,
        require: Requirement = OPPORTUNISTIC,
        check: Checker | None = None,
        auth: tuple[str, str] | None = None,
        verify: ssl.SSLContext | None = None,
    ) -> None:
        """Connect, read the greeting, EHLO (HELO fallback) and STARTTLS when offered (required
        when ``require`` names a policy; ``check`` judges the certificate chain). With ``auth``,
        STARTTLS verified by ``verify`` for ``name``, then AUTH, are required."""
        relay = f"{name or ip}[{ip}]:{port}"
        self.tls_used, self.tls_failure = TLSUsed(), None
        try:
            sock = socket.create_connection((ip, port), timeout=self.connect_timeout)
        except OSError as e:
            raise ConnectFailed(f"connect to {relay}: {_reason(e)}") from None
        sock.settimeout(self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.client = sock, Client(self.helo_name, relay, try_tls=try_tls, auth=auth)
        while True:
            event = self._pump()
            if isinstance(event, Ready):
                if require.policy and not self.client.tls:
                    missing = require.failure("starttls-not-supported", f"no STARTTLS with {relay}", "4.7.4")
                    self._failed(require, missing)
                return
            if isinstance(event, NeedTLS):
                try:
                    tls = (verify or _TLS).wrap_socket(sock, server_hostname=name or ip)
                except (ssl.SSLError, OSError, ValueError) as e:
                    self.close()
                    if auth is not None:  # Postfix's "secure": no plain-text retry, no password
                        if isinstance(e, ssl.SSLCertVerificationError):
                            why = f"certificate verify failed: {e.verify_message}"
                        else:
                            why = getattr(e, "reason", None) or str(e)
                        raise ConnectFailed(
                            f"TLS with {relay} failed ({why}): credentials not sent", auth=True, dsn="4.7.5"
                        ) from None
                    failure = require.failure("validation-failure", f"TLS handshake with {relay} failed")
                    if require.policy and require.enforce:
                        raise TLSPolicyFailed(failure) from None
                    # handshake failed: Postfix's "may" level delivers in plain text instead
                    self.open(ip, port, name=name, try_tls=False)
                    self.tls_failure = failure if require.policy else None
                    return
                self.sock = tls
                verdict = check(require, name or ip, _peer_chain(tls)) if require.policy and check else None
                if verdict is not None:
                    self._failed(require, verdict)
                if require.policy and verdict is None:
                    level = f"verified({require.policy})"
                elif verify is not None:
                    level = "verified(pkix)"  # the smarthost's certificate, checked in the handshake
                else:
                    level = "opportunistic"
                self.tls_used = TLSUsed(level, tls.version() or "", (tls.cipher() or ("",))[0])
                self.client.tls_started()
                continue
            self.close()
            if isinstance(event, Refused):
                raise ConnectFailed(event.text, event.reply, auth=event.auth, dsn="4.7.0" if event.auth else None)
            raise ConnectFailed(f"lost connection with {relay} during greeting")

    def _failed(self, require: Requirement, failure: Failure) -> None:
        """A policy failure: enforced, the connection ends here; in testing mode it is noted."""
        if require.enforce:
            self.close()
            raise TLSPolicyFailed(failure)
        self.tls_failure = failure

    def _pump(self) -> ClientEvent:
        """Write what the client has to say, read until it has something to tell."""
        client, sock = self.client, self.sock
        assert client is not None and sock is not None
        while True:
            for out in client.parts_to_send():  # a body as stored: written, not copied first
                try:
                    sock.sendall(out)
                except TimeoutError:
                    client.timed_out()
                    break
                except OSError:
                    client.eof()
                    break
            event = client.next_event()
            if event is not None:
                if isinstance(event, Closed):
                    self.close()
                return event
            try:
                data = sock.recv(READ_SIZE)
            except TimeoutError:
                client.timed_out()
                continue
            except OSError:
                client.eof()
                continue
            if data:
                client.receive_data(data)
            else:
                client.eof()

    def supports(self, extension: str) -> bool:
        return self.client is not None and self.client.supports(extension)

    def send(
        self, sender: str, recipients: Sequence[str], body: bytes, *, mail_options: Sequence[str] = ()
    ) -> TransactionResult:
        """One mail transaction. Every recipient ends with a reply unless the connection broke.
        Raises ValueError for an address this session cannot carry, before anything is sent."""
        client = self.client
        assert client is not None and client.ready
        client.start_transaction(sender, list(recipients), body, list(mail_options))
        while True:
            event = self._pump()
            if isinstance(event, TransactionDone):
                result = event.result
                break
            if isinstance(event, Closed):
                return TransactionResult({}, broken=True)
        # the session goes on to READY (or through RSET to READY, or closes): read that far
        if not client.closed and not client.ready:
            self._settle()
        return result

    def _settle(self) -> None:
        """After a transaction, until the session is ready again or gone (RSET's reply)."""
        while self.client is not None and not self.client.ready:
            event = self._pump()
            if isinstance(event, Closed):
                return

    def noop(self) -> bool:
        if self.client is None or not self.client.ready:
            return False
        self.client.noop()
        self._settle()
        return self.alive

    @property
    def alive(self) -> bool:
        return self.client is not None and self.sock is not None and not self.client.closed

    def quit(self) -> None:
        if self.client is not None and self.sock is not None and not self.client.closed:
            self.client.quit()
            with contextlib.suppress(OSError):
                self.sock.settimeout(min(self.timeout, 5.0))
                self._settle_quit()
        self.close()

    def _settle_quit(self) -> None:
        assert self.client is not None
        while not self.client.closed:
            self._pump()

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None
        if self.client is not None and not self.client.closed:
            self.client.eof()


log = logging.getLogger("mtaq.worker")

# how long a sweep of everything waits for another thread's QUITs (each at most 5 s; a slot not given
# back by then lapses in SLOT_TTL, worker/limits.py)
CLOSE_WAIT = 30.0


class ConnectionCache:
    """Idle connections kept between jobs, per destination, as Postfix's scache does
    (smtp_connection_cache_time_limit). Each keeps what it was opened with (``extra``: its target
    and its destination slot, which an idle connection still holds: it is a connection). A NOOP
    proves one still lives before it is reused. Shared by the conversations of one process."""

    def __init__(
        self,
        idle_limit: float = 1.0,
        *,
        on_drop: Callable[[Sequence[object]], None] | None = None,
        release: Callable[[str], bool] | None = None,
        look_every: float = 0.2,
    ) -> None:
        self.idle_limit = idle_limit
        self.on_drop = on_drop  # what the dropped connections were kept with, a sweep's together
        # ``release(key)``: idle connections to ``key`` are better closed once idle ``look_every``
        # (their destination's slots are wanted elsewhere), asked every ``look_every`` while idle.
        # Not at once: a process sending to a busy destination has its next job's messages within
        # milliseconds, and closing its connection as its lane emptied for a moment cost a new
        # connection a job (smtp-source, 2 workers: p99 330 -> 480 ms)
        self.release = release
        self.look_every = look_every
        self._idle: dict[str, list[tuple[SMTPConnection, object, float]]] = {}
        self._lock = threading.Lock()
        # connections a sweep has taken out of ``_idle`` and not yet closed and dropped (their slot
        # still held): a sweep of everything waits for them, so that when it returns every slot
        # is given back even while the sweeper thread was closing one (CI: a slot still held
        # after sweep(everything=True), the sweeper had taken the connection a moment before)
        self._closing = 0
        self._closed = threading.Condition(self._lock)
        self._sweeper: threading.Thread | None = None

    def take(self, key: str) -> tuple[SMTPConnection, object] | None:
        self.sweep(release=False)  # the idle limit only: the sweeper thread asks ``release``
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn, extra, _ = idle.pop()
            if conn.noop():
                return conn, extra
            self._drop(conn, extra)

    def give(self, key: str, conn: SMTPConnection, extra: object) -> None:
        if not conn.alive:
            self._drop(conn, extra)
            return
        with self._lock:
            self._idle.setdefault(key, []).append((conn, extra, time.monotonic()))
            if self._sweeper is None:
                sweeper = threading.Thread(target=self._sweep_when_due, name="mtaq-idle-sweep", daemon=True)
                sweeper.start()
                self._sweeper = sweeper

    def _sweep_when_due(self) -> None:
        """Close each idle connection once it has waited ``idle_limit``, whatever else the process
        does: an idle connection holds its destination's slot, and swept only when this process
        next took a connection or beat its heartbeat (5 s), a process whose work for a destination
        had ended kept slots another process's job waited for (bench.slowdest: the last messages
        of a destination went at 3 a second for 5 s, about one run in two). Runs while connections
        are idle; the next give() starts it again."""
        me = threading.current_thread()
        try:
            while True:
                with self._lock:
                    if not self._idle:
                        self._sweeper = None  # under the lock: a give() after this starts another
                        return
                    due = min(t for idle in self._idle.values() for _, _, t in idle) + self.idle_limit
                wait = max(0.0, due - time.monotonic()) + 0.01
                time.sleep(min(wait, self.look_every) if self.release is not None else wait)
                self.sweep()
        except BaseException:
            with self._lock:
                if self._sweeper is me:
                    self._sweeper = None  # the next give() starts another
            raise

    def sweep(self, *, everything: bool = False, release: bool = True) -> None:
        now = time.monotonic()
        stale: dict[str, list[tuple[SMTPConnection, object]]] = {}
        released: set[str] = set()
        if release and self.release is not None and not everything:
            with self._lock:
                keys = list(self._idle)
            released = {k for k in keys if self.release(k)}  # asked outside the lock: it may read Redis
        with self._lock:
            for key, idle in list(self._idle.items()):
                limit = self.look_every if key in released else self.idle_limit
                keep = [(c, e, t) for c, e, t in idle if not everything and now - t <= limit]
                gone = [(c, e) for c, e, t in idle if everything or now - t > limit]
                if gone:
                    stale[key] = gone
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
            self._closing += sum(len(g) for g in stale.values())
        for key, gone in stale.items():
            try:
                self._close_all(gone)
            except Exception:  # the other destinations' connections still go, and their slots
                log.exception("closing idle connections to %s failed", key)
        if everything:
            with self._lock:
                self._closed.wait_for(lambda: self._closing == 0, timeout=CLOSE_WAIT)

    def _close_all(self, gone: list[tuple[SMTPConnection, object]]) -> None:
        """QUIT and close a destination's connections a sweep took out (counted in ``_closing``),
        then give their slots back in one call (issue 15: a sweep often closes several idle
        connections of one destination together; a call each was a Redis command each). A slow
        QUIT holds up its own destination's slots only."""
        try:
            try:
                for conn, _ in gone:
                    try:
                        conn.quit()
                    finally:
                        conn.close()
            finally:
                if self.on_drop is not None:
                    self.on_drop([extra for _, extra in gone])
        finally:
            self._closed_now(len(gone))

    def _drop(self, conn: SMTPConnection, extra: object) -> None:
        with self._lock:
            self._closing += 1
        try:
            conn.close()
            if self.on_drop is not None:
                self.on_drop([extra])
        finally:
            self._closed_now(1)

    def _closed_now(self, n: int) -> None:
        """``n`` connections counted in ``_closing`` are closed and their slots given back."""
        with self._lock:
            self._closing -= n
            self._closed.notify_all()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())


def _peer_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """The certificates the server sent, DER, leaf first (unverified: the policy judges them)."""
    public = getattr(sock, "get_unverified_chain", None)  # Python 3.13
    if public is not None:
        return [bytes(c) for c in public() or []]
    inner = getattr(sock, "_sslobj", None)  # 3.10-3.12 have it, unadvertised, on the C object
    certs = getattr(inner, "get_unverified_chain", lambda: None)()
    if certs:
        return [c.public_bytes(_ENCODING_DER) for c in certs]
    leaf = sock.getpeercert(binary_form=True)
    return [leaf] if leaf else []


_ENCODING_DER = 2  # _ssl.ENCODING_DER


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "Connection timed out"
    if isinstance(e, ConnectionRefusedError):
        return "Connection refused"
    return e.strerror or str(e) or type(e).__name__ if isinstance(e, OSError) else str(e)
