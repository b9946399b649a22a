"""The ``dkim_keys`` table: which private keys sign which domain's mail.

One key a line, ``DOMAIN SELECTOR KEYFILE``, ``#`` comments; KEYFILE absolute or relative to the
table's folder, a PEM private key: RSA of 1024 bits or more, or Ed25519 (PKCS#8, as
``mtaq dkim keygen`` and ``openssl genpkey -algorithm ed25519`` write it). A domain may have
several keys (an RSA and an Ed25519 one: two signatures).

``load_table(path)`` reads it all or raises ``KeyTableError`` with one line naming the file, the
line and what is wrong, never the key. ``KeyTable`` holds what was read and re-reads the file when
it (or a key file) changes: at most one stat() round per ``check_every`` seconds of the injected
clock, no thread. A table that breaks on a re-read is logged once and the old one kept.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from common.dkim import SigningKey, keys_for

__all__ = ["MIN_RSA_BITS", "KeyTable", "KeyTableError", "load_key", "load_table", "parse_table"]

log = logging.getLogger("mtaq.dkim")

# RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits (verifiers ignore shorter ones)
MIN_RSA_BITS = 1024

Table = Mapping[str, tuple[SigningKey, ...]]


class KeyTableError(Exception):
    """A key table or key file that cannot be used; the message is one line for the operator."""


def parse_table(text: str, where: str) -> list[tuple[int, str, str, str]]:
    """(line number, domain, selector, key file) of each entry; KeyTableError on a malformed line."""
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise KeyTableError(f"dkim_keys {where} line {number}: expected DOMAIN SELECTOR KEYFILE")
        domain, selector, keyfile = parts
        domain = domain.lower().rstrip(".")
        if not domain or not selector.replace("-", "").replace(".", "").replace("_", "").isalnum():
            raise KeyTableError(f"dkim_keys {where} line {number}: bad domain or selector")
        out.append((number, domain, selector, keyfile))
    return out


def load_key(path: Path) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    """The private key in a PEM file; KeyTableError (one line, no key material) when it is not usable."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyTableError(f"key file {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyTableError(f"key file {path}: encrypted with a passphrase; mtaq needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        # the library's message may quote the data; ours does not
        raise KeyTableError(f"key file {path}: not a PEM RSA or Ed25519 private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyTableError(f"key file {path}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} needed")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise KeyTableError(f"key file {path}: a {type(key).__name__}; DKIM signs with RSA or Ed25519 only")


def load_table(path: str | os.PathLike[str]) -> Table:
    """Every key of the table, by domain; KeyTableError when the table or any key cannot be used."""
    table_path = Path(path)
    try:
        text = table_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise KeyTableError(f"dkim_keys {table_path}: {reason}") from None
    keys: dict[str, list[SigningKey]] = {}
    for number, domain, selector, keyfile in parse_table(text, str(table_path)):
        file = Path(keyfile) if os.path.isabs(keyfile) else table_path.parent / keyfile
        try:
            private = load_key(file)
        except KeyTableError as e:
            raise KeyTableError(f"dkim_keys {table_path} line {number}: {e}") from None
        keys.setdefault(domain, []).append(SigningKey(domain, selector, private, str(file)))
    return MappingProxyType({d: tuple(k) for d, k in keys.items()})


def _versions(path: Path, table: Table) -> tuple[tuple[int, int, int], ...]:
    files = [path, *(Path(k.source) for ks in table.values() for k in ks)]
    out = []
    for f in files:
        st = f.stat()
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class KeyTable:
    """The keys in force, re-read when the table or one of its key files changes."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic, check_every: float = 1.0) -> None:
        self.path = Path(path)
        self.clock = clock
        self.check_every = check_every
        self.table = load_table(self.path)  # KeyTableError at start-up: the caller exits 78
        self._version = self._stat()
        self._checked = clock()
        self._failing = False
        log.info("dkim_keys: %s", self.describe())

    def describe(self) -> str:
        keys = [k for ks in self.table.values() for k in ks]
        return f"{len(keys)} key(s) for {len(self.table)} domain(s) from {self.path}"

    def _stat(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            return _versions(self.path, self.table)
        except OSError:
            return None

    def refresh(self) -> None:
        now = self.clock()
        if now - self._checked < self.check_every:
            return
        self._checked = now
        version = self._stat()
        if version is not None and version == self._version:
            return
        try:
            table = load_table(self.path)
        except KeyTableError as e:
            if not self._failing:  # once per breakage, not once per message
                log.error("%s: keeping the %s", e, self.describe())
            self._failing = True
            return
        self.table = table
        self._failing = False
        self._version = self._stat()
        log.info("dkim_keys re-read: %s", self.describe())

    def keys_for(self, domain: str) -> Sequence[SigningKey]:
        self.refresh()
        return keys_for(self.table, domain)
