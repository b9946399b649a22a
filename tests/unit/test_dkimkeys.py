"""The dkim_keys table (common/dkimkeys.py): bad files are one line, re-reads keep the old table."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.dkimkeys import KeyTable, KeyTableError, load_table
from tests.dkimkeys import new_key, write_key, write_table
from tests.unit.fakeclock import FakeClock


def test_table_with_both_algorithms_and_relative_paths(tmp_path: Path) -> None:
    table, _ = write_table(tmp_path, [("example.com", "r", "rsa"), ("Example.COM.", "e", "ed25519")])
    keys = load_table(table)
    assert [k.algorithm for k in keys["example.com"]] == ["rsa-sha256", "ed25519-sha256"]


def test_absolute_key_path(tmp_path: Path) -> None:
    key = write_key(tmp_path / "k.pem", new_key("ed25519"))
    (tmp_path / "sub").mkdir()
    table = tmp_path / "sub" / "t"
    table.write_text(f"example.com s {key}  # absolute\n")
    assert load_table(table)["example.com"][0].source == str(key)


def _one_line_error(table: Path) -> str:
    with pytest.raises(KeyTableError) as e:
        load_table(table)
    text = str(e.value)
    assert "\n" not in text and "PRIVATE KEY" not in text and "MII" not in text
    return text


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"not a key", "not a PEM RSA or Ed25519 private key"),
        (b"-----BEGIN PRIVATE KEY-----\nMIIBroken\n-----END PRIVATE KEY-----\n", "not a PEM"),
    ],
)
def test_bad_key_files(tmp_path: Path, content: bytes, expect: str) -> None:
    (tmp_path / "k.pem").write_bytes(content)
    (tmp_path / "t").write_text("example.com s k.pem\n")
    text = _one_line_error(tmp_path / "t")
    assert expect in text and "line 1" in text and "k.pem" in text


def test_short_rsa_key_refused(tmp_path: Path) -> None:
    # cryptography refuses to make one; openssl still does
    subprocess.run(["openssl", "genrsa", "-out", str(tmp_path / "k.pem"), "768"], check=True, capture_output=True)
    (tmp_path / "t").write_text("example.com s k.pem\n")
    assert "768 bits" in _one_line_error(tmp_path / "t")


def test_ec_key_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (tmp_path / "t").write_text("example.com s k.pem\n")
    assert "RSA or Ed25519 only" in _one_line_error(tmp_path / "t")


def test_missing_files_and_bad_lines(tmp_path: Path) -> None:
    assert "No such file" in _one_line_error(tmp_path / "nope")
    (tmp_path / "t").write_text("example.com s missing.pem\n")
    assert "missing.pem" in _one_line_error(tmp_path / "t")
    (tmp_path / "t").write_text("\n# c\nexample.com only-two\n")
    assert "line 3: expected DOMAIN SELECTOR KEYFILE" in _one_line_error(tmp_path / "t")


def test_reread_on_change_and_old_table_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table, _ = write_table(tmp_path, [("example.com", "r", "rsa")])
    clock = FakeClock()
    kt = KeyTable(str(table), clock=clock)
    assert [k.selector for k in kt.keys_for("a.example.com")] == ["r"]
    write_key(tmp_path / "e.pem", new_key("ed25519"))
    table.write_text("example.com r r.example.com.pem\nexample.org e e.pem\n")
    assert kt.keys_for("example.org") == ()  # not looked at again within a second
    clock.now += 1.5
    assert [k.selector for k in kt.keys_for("example.org")] == ["e"]
    # a broken key on a re-read: one error logged, the old table kept
    (tmp_path / "e.pem").write_bytes(b"garbage, and longer than before")
    with caplog.at_level(logging.INFO, logger="mtaq.dkim"):
        for _ in range(3):
            clock.now += 1.5
            assert [k.selector for k in kt.keys_for("example.org")] == ["e"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "e.pem" in errors[0].getMessage() and "keeping" in errors[0].getMessage()
    assert "garbage" not in caplog.text
    # fixed: read again
    write_key(tmp_path / "e.pem", new_key("ed25519"))
    os.utime(tmp_path / "e.pem", ns=(1, 1))
    clock.now += 1.5
    assert [k.selector for k in kt.keys_for("example.org")] == ["e"]
    assert not kt.failing
