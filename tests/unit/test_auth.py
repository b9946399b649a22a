"""Credentials (scrypt) and the AUTH failure limiter, without sockets."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from ingress.auth import AuthLimiter, Credentials, hash_password, set_password, verify_password
from tests.unit.fakeclock import FakeClock


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


def test_limiter_counts_failures_only() -> None:
    clock = FakeClock()
    lim = AuthLimiter(max_failures=3, window=60, clock=clock)
    for i in range(3):
        clock.now = float(i)
        assert not lim.blocked("1.2.3.4")
        lim.failed("1.2.3.4")
    clock.now = 10.0
    assert lim.blocked("1.2.3.4")
    assert not lim.blocked("5.6.7.8")  # per address
    clock.now = 60.5
    assert not lim.blocked("1.2.3.4")  # the first failure left the window


def test_parallel_checks_are_not_failures_and_queue_per_address() -> None:
    # Issue 11.1: ten correct logins at once from one address are all checked; they take turns,
    # so that guesses in parallel still see the failures before them
    async def scenario() -> tuple[list[bool], int, list[bool]]:
        lim = AuthLimiter(max_failures=3, max_concurrent=4)
        running = peak = 0

        async def correct() -> bool:
            nonlocal running, peak
            async with lim.checking("9.9.9.9") as allowed:
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0)
                running -= 1
                return allowed

        ok = await asyncio.gather(*(correct() for _ in range(10)))

        async def guess() -> bool:
            async with lim.checking("6.6.6.6") as allowed:
                if allowed:
                    await asyncio.sleep(0)
                    lim.failed("6.6.6.6")
                return allowed

        guesses = await asyncio.gather(*(guess() for _ in range(8)))
        return list(ok), peak, list(guesses)

    ok, peak, guesses = asyncio.run(scenario())
    assert ok == [True] * 10
    assert peak == 1  # one address, one check at a time
    assert guesses == [True] * 3 + [False] * 5  # eight guesses at once: three verdicts, no more


def test_concurrent_checks_are_bounded_across_addresses() -> None:
    async def scenario() -> int:
        lim = AuthLimiter(max_concurrent=2)
        running = peak = 0
        gate = asyncio.Event()

        async def check(ip: str) -> None:
            nonlocal running, peak
            async with lim.checking(ip) as allowed:
                assert allowed
                running += 1
                peak = max(peak, running)
                await gate.wait()
                running -= 1

        tasks = [asyncio.create_task(check(f"10.0.0.{i}")) for i in range(6)]
        for _ in range(10):
            await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
        assert lim._turns == {}  # nothing left behind per address
        return peak

    assert asyncio.run(scenario()) == 2


def test_limiter_memory_stays_bounded() -> None:
    lim = AuthLimiter(max_failures=2, window=1)
    for _ in range(100):
        lim.failed("1.1.1.1", now=0.0)
    assert len(lim._fails["1.1.1.1"]) == 2
    for i in range(10050):
        lim.failed(f"10.0.{i // 256}.{i % 256}", now=float(i) / 1000)
    assert len(lim._fails) <= 10001
