"""Test helpers for DKIM: key files, a key table, and dkimpy's verifier with the record in hand."""

from __future__ import annotations

from pathlib import Path

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from common.dkim import SigningKey, public_key_record

__all__ = ["dkimpy_verify", "write_key", "write_table"]

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def new_key(kind: str, bits: int = 2048) -> PrivateKey:
    return ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else rsa.generate_private_key(65537, bits)


def write_key(path: Path, key: PrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def write_table(folder: Path, entries: list[tuple[str, str, str]]) -> tuple[Path, dict[str, SigningKey]]:
    """A key table with a new key per (domain, selector, kind); the keys by ``selector._domainkey.domain``."""
    lines = []
    keys = {}
    for domain, selector, kind in entries:
        key = new_key(kind)
        file = write_key(folder / f"{selector}.{domain}.pem", key)
        lines.append(f"{domain} {selector} {file.name}")
        keys[f"{selector}._domainkey.{domain}"] = SigningKey(domain, selector, key, str(file))
    table = folder / "dkim_keys"
    table.write_text("# test keys\n" + "\n".join(lines) + "\n")
    return table, keys


def dkimpy_verify(message: bytes, keys: dict[str, SigningKey], *, index: int = 0) -> bool:
    """dkimpy's verdict on the ``index``-th DKIM-Signature, its DNS answered from ``keys``."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        key = keys.get(name.decode().rstrip("."))
        return public_key_record(key).encode() if key else b""

    try:
        return bool(dkimpy.DKIM(message).verify(idx=index, dnsfunc=dnsfunc))
    except dkimpy.DKIMException:  # a mismatch is raised, not returned
        return False
