"""`mtaq dkim keygen` (a key and the DNS record to publish, like opendkim-genkey) and `mtaq dkim check`
(does each key of the table match what its selector publishes)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from common.dkim import SigningKey, public_key_base64, public_key_record
from common.dkimkeys import MIN_RSA_BITS, KeyTableError, load_table
from common.mx import make_resolver
from common.settings import Settings
from mtaq.opscmd import add_settings

__all__ = ["add_dkim_parser", "check_record", "cmd_dkim", "txt_record"]

# RFC 1035 §3.3.14: a TXT record is a sequence of character-strings of at most 255 octets each
TXT_STRING_MAX = 255

Lookup = Callable[[str], list[str]]  # the TXT strings of each record at a name, joined per record


def add_dkim_parser(sub: Any) -> None:
    p = sub.add_parser("dkim", help="DKIM keys: make one (keygen), compare the table with DNS (check)")
    dsub = p.add_subparsers(dest="dkim_command", required=True)
    gen = dsub.add_parser(
        "keygen",
        help="write a private key (mode 0600) and print the TXT record to publish",
        description="Writes a new private key to --key-file and prints the DNS record to publish and "
        "the line to add to the dkim_keys table.",
    )
    gen.add_argument("domain", help="the signing domain (d=), e.g. example.com")
    gen.add_argument("selector", help="the selector (s=), e.g. 2026a")
    gen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa", help="default rsa")
    gen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048, at least 1024)")
    gen.add_argument("--key-file", "--key_file", dest="key_file", required=True, help="where to write the key")
    chk = dsub.add_parser(
        "check",
        help="for each key of dkim_keys, does the published record match it (exit 1 if one does not)",
    )
    add_settings(chk, ("dkim_keys", "dns_servers"), nested=True)


def txt_record(domain: str, selector: str, value: str) -> str:
    """The zone file line, the value split into 255-octet strings."""
    parts = [value[i : i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]
    return f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT " + " ".join(f'"{p}"' for p in parts)


def _write_private(path: Path, pem: bytes) -> None:
    # O_EXCL: never overwrite a key that may be published; 0600 from the start, not chmod after
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def cmd_keygen(domain: str, selector: str, algorithm: str, bits: int, key_file: str) -> int:
    if algorithm == "rsa" and not MIN_RSA_BITS <= bits <= 8192:
        print(f"mtaq dkim keygen: --bits {bits}: give {MIN_RSA_BITS} to 8192 (2048 is usual)", file=sys.stderr)
        return 2
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = (
        ed25519.Ed25519PrivateKey.generate() if algorithm == "ed25519" else rsa.generate_private_key(65537, bits)
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = Path(key_file)
    try:
        _write_private(path, pem)
    except FileExistsError:
        print(f"mtaq dkim keygen: {path} exists; remove it or give another --key-file", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mtaq dkim keygen: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    key = SigningKey(domain.lower().rstrip("."), selector, private, str(path))
    print(f"; publish in DNS, then add `{key.domain} {selector} {path.resolve()}` to dkim_keys")
    print(txt_record(key.domain, selector, public_key_record(key)))
    return 0


def parse_tags(value: str) -> dict[str, str]:
    """RFC 6376 §3.2 tag-list: ``t=v; t=v`` with whitespace anywhere ignored in values."""
    tags = {}
    for item in value.split(";"):
        name, eq, v = item.partition("=")
        if eq:
            tags[name.strip()] = "".join(v.split())
    return tags


def check_record(key: SigningKey, records: Sequence[str]) -> str | None:
    """None when a published record matches the private key, else what is wrong (one phrase)."""
    if not records:
        return "no TXT record published"
    wanted = public_key_base64(key.private)
    problems = []
    for record in records:
        tags = parse_tags(record)
        if tags.get("v", "DKIM1") != "DKIM1":
            problems.append("the record is not v=DKIM1")
        elif tags.get("k", "rsa") != key.key_type:
            problems.append(f"the record says k={tags.get('k', 'rsa')}, the key is {key.key_type}")
        elif not tags.get("p"):
            problems.append("the record has an empty p= (the key is revoked)")
        elif tags["p"] != wanted:
            problems.append("the published p= is another key's")
        else:
            return None
    return "; ".join(dict.fromkeys(problems))


def dns_lookup(servers: Sequence[tuple[str, int]]) -> Lookup:
    resolver = make_resolver(servers)

    def lookup(name: str) -> list[str]:
        try:
            answer = resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        return [b"".join(r.strings).decode("ascii", "replace") for r in answer]

    return lookup


def cmd_check(settings: Settings, lookup: Lookup | None = None) -> int:
    if not settings.dkim_keys:
        print("mtaq dkim check: say where the key table is: --dkim-keys PATH (or MTAQ_DKIM_KEYS)", file=sys.stderr)
        return 2
    try:
        table = load_table(settings.dkim_keys)
    except KeyTableError as e:
        print(f"mtaq dkim check: {e}", file=sys.stderr)
        return 1
    lookup = lookup or dns_lookup(settings.dns_server_list)
    bad = 0
    for keys in table.values():
        for key in keys:
            name = f"{key.selector}._domainkey.{key.domain}"
            try:
                problem = check_record(key, lookup(name))
            except dns.exception.DNSException as e:
                problem = f"lookup failed: {e.__class__.__name__} (try again; check dns_servers)"
            if problem is None:
                print(f"{name}: ok ({key.key_type}, {key.source})")
            else:
                bad += 1
                print(f"{name}: MISMATCH: {problem} ({key.key_type}, {key.source})")
    if not table:
        print(f"mtaq dkim check: {settings.dkim_keys} has no keys", file=sys.stderr)
    return 1 if bad else 0


def cmd_dkim(settings: Settings, args: argparse.Namespace) -> int:
    if args.dkim_command == "keygen":
        return cmd_keygen(args.domain, args.selector, args.algorithm, args.bits, args.key_file)
    return cmd_check(settings)
