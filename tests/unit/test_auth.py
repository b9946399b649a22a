"""Credentials (scrypt) and the AUTH failure limiter, without sockets."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from ingress.auth import AuthLimiter, Credentials, hash_password, set_password, verify_password


def test_hash_round_trip_and_no_plain_text() -> None:
    encoded = hash_password("s3cret")
    assert encoded.startswith("$scrypt$n=16384,r=8,p=1$") and "s3cret" not in encoded
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)


@pytest.mark.parametrize(
    "damaged",
    [
        "",
        "plain",
        "$md5$x$y$z",
        "$scrypt$n=16384,r=8$AAAA$AAAA",
        "$scrypt$n=1000,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # n not 2^k
        "$scrypt$n=1073741824,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAA",  # past maxmem
        "$scrypt$n=16384,r=8,p=1$!!$AAAA",
        "$scrypt$n=x,r=8,p=1$AAAA$AAAA",
    ],
)
def test_damaged_hash_is_a_failed_check_not_an_exception(damaged: str) -> None:
    assert verify_password("anything", damaged) is False


def test_credentials_reload_on_every_change(tmp_path: Path) -> None:
    f = tmp_path / "users"
    creds = Credentials(str(f))
    assert not creds.verify("alice", "one")  # no file yet
    set_password(str(f), "alice", "one")
    assert creds.verify("alice", "one")
    set_password(str(f), "alice", "two")  # within the same mtime tick, quite possibly
    assert creds.verify("alice", "two") and not creds.verify("alice", "one")
    assert not creds.verify("bob", "two")


def test_unknown_user_costs_one_scrypt_like_a_known_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "users"
    set_password(str(f), "alice", "pw")
    creds = Credentials(str(f))
    creds.verify("nobody", "pw")  # the decoy hash is made once, on first use
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: Any, **kw: Any) -> bytes:
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    for user in ("alice", "nobody", "alice", "nobody"):
        calls.clear()
        assert not creds.verify(user, "wrong")
        assert len(calls) == 1, user  # timing does not tell who exists


def test_limiter_counts_failures_and_checks_in_flight() -> None:
    lim = AuthLimiter(max_failures=3, window=60)
    for i in range(3):
        assert lim.begin("1.2.3.4", now=float(i))
        lim.end("1.2.3.4", failed=True, now=float(i))
    assert not lim.begin("1.2.3.4", now=10.0)  # blocked
    assert lim.begin("5.6.7.8", now=10.0)  # per address
    assert lim.begin("1.2.3.4", now=60.5)  # the first failure left the window
    # checks in flight count: three at once from one address, the fourth waits its turn
    lim2 = AuthLimiter(max_failures=3)
    assert [lim2.begin("9.9.9.9", now=0.0) for _ in range(4)] == [True, True, True, False]
    lim2.end("9.9.9.9", failed=False, now=0.0)
    assert lim2.begin("9.9.9.9", now=0.0)


def test_limiter_memory_stays_bounded() -> None:
    lim = AuthLimiter(max_failures=2, window=1)
    for _ in range(100):
        lim.failed("1.1.1.1", now=0.0)
    assert len(lim._fails["1.1.1.1"]) == 2
    for i in range(10050):
        lim.failed(f"10.0.{i // 256}.{i % 256}", now=float(i) / 1000)
    assert len(lim._fails) <= 10001
