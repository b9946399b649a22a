"""The ``dkim_keys`` table: which private keys sign which domain's mail.

One key a line, ``DOMAIN SELECTOR KEYFILE``, ``#`` comments; KEYFILE absolute or relative to the
table's folder, a PEM private key: RSA of 1024 bits or more, or Ed25519 (PKCS#8, as
``mtaq dkim keygen`` and ``openssl genpkey -algorithm ed25519`` write it). A domain may have
several keys (an RSA and an Ed25519 one: two signatures).

``load_table(path)`` reads it all or raises ``KeyTableError`` with one line naming the file, the
line and what is wrong, never the key. ``KeyTable`` holds what was read and re-reads it when the
table or a key file changes (common/watched.py: one stat() round a second at most; a table that
breaks on a re-read is logged once and the old one kept).
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
from common.watched import Watched

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


class KeyTable:
    """The keys in force, re-read when the table or one of its key files changes."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic, check_every: float = 1.0) -> None:
        self.path = Path(path)
        # KeyTableError at start-up: the caller exits 78
        self._table = Watched(
            lambda: load_table(self.path),
            lambda table: [self.path, *(Path(k.source) for ks in table.values() for k in ks)],
            errors=(KeyTableError,),
            describe=self._describe,
            log=log,
            clock=clock,
            check_every=check_every,
        )
        log.info("%s", self._describe(self._table.value))

    def _describe(self, table: Table) -> str:
        keys = [k for ks in table.values() for k in ks]
        return f"dkim_keys: {len(keys)} key(s) for {len(table)} domain(s) from {self.path}"

    @property
    def failing(self) -> bool:
        return self._table.failing

    def keys_for(self, domain: str) -> Sequence[SigningKey]:
        return keys_for(self._table.get(), domain)

    def key(self, domain: str, selector: str) -> SigningKey | None:
        """The key of exactly this domain and selector, if the table has it now."""
        return next((k for k in self._table.get().get(domain, ()) if k.selector == selector), None)
