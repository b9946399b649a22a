"""SMTP AUTH credentials: a file of scrypt-hashed passwords, and a limiter for failed attempts.

File format, one user a line (``mtaq passwd`` writes it): ``user:$scrypt$n=16384,r=8,p=1$<salt>$<key>``
with salt and key in unpadded base64. scrypt is the memory-hard KDF of OpenSSL, through hashlib:
no new dependency, and no plain-text or fast-hash passwords ever.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

__all__ = ["AuthLimiter", "Credentials", "hash_password", "set_password", "verify_password"]

# OWASP's scrypt floor: N=2^17, r=8, p=1 (128 MiB). We take N=2^14 (16 MiB, ~50 ms here) so that a
# burst of AUTH attempts cannot exhaust the ingress's memory; the limiter bounds guessing instead.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
KEY_LEN = 32


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s + "=" * (-len(s) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    key = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=KEY_LEN, maxmem=64 * 1024 * 1024
    )
    return f"$scrypt$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        _, scheme, params, salt_s, key_s = encoded.split("$")
        if scheme != "scrypt":
            return False
        p = dict(kv.split("=") for kv in params.split(","))
        n, r, par = int(p["n"]), int(p["r"]), int(p["p"])
        salt, key = _unb64(salt_s), _unb64(key_s)
        # a damaged line (n not a power of two, a memory cost past maxmem, an empty key) makes
        # hashlib raise: that is a failed check, not an exception in the ingress
        got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=par, dklen=len(key), maxmem=256 * 1024 * 1024)
    except (ValueError, KeyError, OverflowError, MemoryError):
        return False
    return hmac.compare_digest(got, key)


@functools.cache
def _decoy() -> str:
    """A hash to check unknown users against: one scrypt for them as for a known user."""
    return hash_password("decoy", salt=b"\0" * 16)


class Credentials:
    """The auth file, re-read when it changes (``mtaq passwd`` needs no restart)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._version: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._users, self._version = {}, None
            return
        # `mtaq passwd` replaces the file (a new inode): two changes within one mtime tick still show
        version = (st.st_mtime_ns, st.st_ino, st.st_size)
        if version == self._version:
            return
        users: dict[str, str] = {}
        for line in self.path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and ":" in line:
                user, _, encoded = line.partition(":")
                users[user] = encoded
        self._users, self._version = users, version

    def verify(self, username: str, password: str) -> bool:
        self._reload()
        encoded = self._users.get(username)
        if encoded is None:
            # spend the same time as for a known user (one scrypt), so timing does not reveal who exists
            verify_password(password, _decoy())
            return False
        return verify_password(password, encoded)


def set_password(path: str, username: str, password: str) -> None:
    """Add or replace a user, atomically, file mode 0600."""
    if not username or ":" in username or any(c.isspace() for c in username):
        raise ValueError("user name must be non-empty, without ':' or white space")
    p = Path(path)
    lines = p.read_text().splitlines() if p.exists() else []
    lines = [ln for ln in lines if ln.partition(":")[0] != username]
    lines.append(f"{username}:{hash_password(password)}")
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, p)


class AuthLimiter:
    """Failed AUTH attempts per client address within a sliding window (Postfix's anvil
    smtpd_client_auth_rate_limit): past the limit an address gets no more password checks.

    Failures alone count, as anvil's do: a correct password is never refused because other checks
    are running. Guessing in parallel is bounded another way: the checks of one address run one at
    a time (``checking``), each seeing the failures of those before it, so an address with fifty
    connections still gets no more than ``max_failures`` verdicts per window; and at most
    ``max_concurrent`` scrypt checks run in the process at once (16 MiB each), the rest queue.
    One limiter per ingress process: with N processes an address may fail up to N * max_failures
    times per window."""

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 60.0,
        *,
        max_concurrent: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_concurrent = max_concurrent
        self.clock = clock
        self._fails: dict[str, deque[float]] = {}
        # addresses with a check running or queued: their turn, and how many hold or wait for it
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}
        self._kdf: asyncio.Semaphore | None = None  # made in the event loop that uses it

    def _recent(self, ip: str, now: float) -> deque[float]:
        q = self._fails.setdefault(ip, deque())
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def blocked(self, ip: str, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return len(self._recent(ip, now)) >= self.max_failures

    def failed(self, ip: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        q = self._recent(ip, now)
        if len(q) < self.max_failures:  # past the limit nothing more needs remembering
            q.append(now)
        if len(self._fails) > 10000:  # bound memory against many addresses
            for k in [k for k, v in self._fails.items() if not v or v[-1] <= now - self.window][:5000]:
                del self._fails[k]

    @contextlib.asynccontextmanager
    async def checking(self, ip: str) -> AsyncIterator[bool]:
        """Wait for this address's turn and a free check slot; yields whether the password may be
        checked (False: the address is over its limit). The caller reports a wrong password with
        ``failed`` before leaving, so the next in line sees it."""
        if self._kdf is None:
            self._kdf = asyncio.Semaphore(self.max_concurrent)
        turn, users = self._turns.get(ip, (asyncio.Lock(), 0))
        self._turns[ip] = (turn, users + 1)
        try:
            async with turn:
                if self.blocked(ip):
                    yield False
                    return
                async with self._kdf:
                    yield True
        finally:
            turn, users = self._turns[ip]
            if users > 1:
                self._turns[ip] = (turn, users - 1)
            else:
                del self._turns[ip]  # nobody else holds or waits for this address's turn
