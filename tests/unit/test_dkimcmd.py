"""`mtaq dkim keygen` and `mtaq dkim check` (mtaq/dkimcmd.py) without DNS: the record, the checks."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from common.dkim import SigningKey, public_key_record
from common.dkimkeys import load_table
from common.settings import Settings
from mtaq.cli import main
from mtaq.dkimcmd import check_record, cmd_check, txt_record
from tests.dkimkeys import new_key, write_table


def test_txt_record_split_into_255_octet_strings() -> None:
    value = "v=DKIM1; k=rsa; p=" + "A" * 600
    line = txt_record("example.com.", "s1", value)
    assert line.startswith('s1._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=AAA')
    parts = line.split(" IN TXT ", 1)[1].strip('"').split('" "')
    assert [len(p) for p in parts] == [255, 255, len(value) - 510] and "".join(parts) == value


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_writes_a_0600_key_and_prints_its_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algorithm: str
) -> None:
    key_file = tmp_path / "k.pem"
    assert main(["dkim", "keygen", "Example.com", "s1", "--algorithm", algorithm, "--key-file", str(key_file)]) == 0
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    out = capsys.readouterr().out
    (tmp_path / "t").write_text(f"example.com s1 {key_file}\n")
    key = load_table(tmp_path / "t")["example.com"][0]
    record = "".join(out.split(" IN TXT ", 1)[1].strip().strip('"').split('" "'))
    assert record == public_key_record(key) and f"k={algorithm};" in record
    # never over an existing key
    assert main(["dkim", "keygen", "example.com", "s1", "--key-file", str(key_file)]) == 1
    assert "exists" in capsys.readouterr().err


def test_keygen_refuses_short_rsa(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dkim", "keygen", "example.com", "s", "--bits", "512", "--key-file", str(tmp_path / "k")]) == 2
    assert "1024 to 8192" in capsys.readouterr().err and not (tmp_path / "k").exists()


def test_check_record() -> None:
    key = SigningKey("example.com", "s", new_key("ed25519"))
    other = SigningKey("example.com", "s", new_key("ed25519"))
    good = public_key_record(key)
    assert check_record(key, [good]) is None
    assert check_record(key, ["v=spf1 -all", good.replace("; ", ";\t ")]) is None
    assert check_record(key, []) == "no TXT record published"
    assert check_record(key, [public_key_record(other)]) == "the published p= is another key's"
    assert check_record(key, [good.replace("k=ed25519", "k=rsa")]) == "the record says k=rsa, the key is ed25519"
    assert "revoked" in (check_record(key, ["v=DKIM1; k=ed25519; p="]) or "")


def test_check_one_line_per_key_exit_1_on_a_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table, keys = write_table(tmp_path, [("example.com", "a", "rsa"), ("example.org", "b", "ed25519")])
    published = {name: [public_key_record(k)] for name, k in keys.items()}
    settings = Settings(dkim_keys=str(table), hostname="mx.example.com")
    assert cmd_check(settings, lambda name: published.get(name, [])) == 0
    assert capsys.readouterr().out.count(": ok (") == 2
    published["b._domainkey.example.org"] = [public_key_record(keys["a._domainkey.example.com"])]
    assert cmd_check(settings, lambda name: published.get(name, [])) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("a._domainkey.example.com: ok")
    assert out[1].startswith("b._domainkey.example.org: MISMATCH: the record says k=rsa")
