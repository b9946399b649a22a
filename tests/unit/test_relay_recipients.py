"""Inbound relay without backscatter (issue 11.3, ingress side): the relay_recipients table, the
verification cache with a fake probe and a fake clock, the session's VerifyRecipient, and the
envelope's trust flag."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from pathlib import Path

import pytest

from common.envelope import Envelope, Recipient
from ingress import replies
from ingress.config import SessionConfig
from ingress.events import Peer, Send, Transaction, VerifyRecipient
from ingress.recipients import RecipientTable, parse_table
from ingress.replies import Reply
from ingress.session import Session, State
from ingress.verify import TEMPFAIL_TTL, Probe, Verdict, Verifier
from tests.unit.fakeclock import FakeClock

OUTSIDE = Peer("203.0.113.9", 40001)
INSIDE = Peer("192.0.2.7", 40000)


# -- the table ---------------------------------------------------------------------------------------
def test_table_format() -> None:
    text = "# valid recipients\nBob@Ours.Test\n  alice@ours.test   # trailing comment\n@wild.test.\n\nnot-an-address\n"
    assert parse_table(text) == frozenset({"bob@ours.test", "alice@ours.test", "@wild.test"})


def test_table_lookup_and_reload_on_change(tmp_path: Path) -> None:
    f = tmp_path / "relay_recipients"
    f.write_text("bob@ours.test\n@wild.test\n")
    clock = FakeClock()
    table = RecipientTable(str(f), clock=clock, check_every=1.0)
    assert table.check("bob@ours.test") is None
    assert table.check("BOB@OURS.TEST") is None
    assert table.check("anyone@wild.test") is None
    assert table.check("carol@ours.test") == replies.UNKNOWN_RELAY_RECIPIENT
    f.write_text("carol@ours.test\n")
    os.utime(f, ns=(1, 10**18))  # a new mtime whatever the file system's granularity
    assert table.check("carol@ours.test") == replies.UNKNOWN_RELAY_RECIPIENT  # not looked at yet
    clock.now += 1.0
    assert table.check("carol@ours.test") is None  # re-read once the interval passed
    assert table.check("bob@ours.test") == replies.UNKNOWN_RELAY_RECIPIENT
    # a table that goes away keeps its last contents; one never read answers 451, not 250 or 550
    f.unlink()
    clock.now += 1.0
    assert table.check("carol@ours.test") is None
    missing = RecipientTable(str(tmp_path / "nope"), clock=clock)
    assert missing.check("bob@ours.test") == replies.RECIPIENT_TABLE_UNAVAILABLE


# -- the verification cache ----------------------------------------------------------------------------
def test_verifier_caches_by_verdict_with_its_ttl() -> None:
    clock = FakeClock()
    asked: list[str] = []
    answers = {
        "good@ours.test": Probe(Verdict.VALID, "250"),
        "gone@ours.test": Probe(Verdict.INVALID, "550 5.1.1 no such user"),
        "slow@ours.test": Probe(Verdict.UNKNOWN, "451 try later"),
    }

    async def probe(address: str) -> Probe:
        asked.append(address)
        return answers[address.lower()]

    v = Verifier(probe, positive_ttl=100.0, negative_ttl=10.0, clock=clock)

    async def run() -> None:
        assert await v.check("good@ours.test") is None
        assert await v.check("gone@ours.test") == replies.UNDELIVERABLE_RECIPIENT
        assert await v.check("slow@ours.test") == replies.UNVERIFIED_RECIPIENT  # 450: never accepted
        assert await v.check("GOOD@ours.test") is None  # cached, any case
        assert asked == ["good@ours.test", "gone@ours.test", "slow@ours.test"]
        clock.now += 11  # past the negative TTL, within the positive one
        await v.check("gone@ours.test")
        await v.check("good@ours.test")
        assert asked[3:] == ["gone@ours.test"]
        clock.now += TEMPFAIL_TTL
        await v.check("slow@ours.test")
        assert asked[-1] == "slow@ours.test" and len(asked) == 5
        clock.now += 100
        await v.check("good@ours.test")
        assert asked[-1] == "good@ours.test"

    asyncio.run(run())


def test_a_refusal_by_dns_is_answered_with_its_own_status_and_cached_as_invalid() -> None:
    # ingress/verify.smtp_probe gives DNS refusals (null MX, NXDOMAIN, loop) their reply
    clock = FakeClock()
    asked: list[str] = []

    async def probe(address: str) -> Probe:
        asked.append(address)
        return Probe(
            Verdict.INVALID, "5.1.10 Domain null.test does not accept mail (nullMX)", replies.NULL_MX_RECIPIENT
        )

    v = Verifier(probe, positive_ttl=100.0, negative_ttl=10.0, clock=clock)

    async def run() -> None:
        assert await v.check("bob@null.test") == replies.NULL_MX_RECIPIENT
        clock.now += 9
        assert await v.check("bob@null.test") == replies.NULL_MX_RECIPIENT
        assert asked == ["bob@null.test"]  # remembered for the negative TTL
        clock.now += 2
        await v.check("bob@null.test")
        assert len(asked) == 2

    asyncio.run(run())
    assert str(replies.NULL_MX_RECIPIENT).startswith("550 5.1.10 ")


def test_concurrent_askers_share_one_probe_and_a_crash_is_450() -> None:
    calls = 0

    async def run() -> list[Reply | None]:
        gate = asyncio.Event()

        async def probe(address: str) -> Probe:
            nonlocal calls
            calls += 1
            await gate.wait()
            if address.startswith("boom"):
                raise RuntimeError("bug")
            return Probe(Verdict.VALID, "250")

        v = Verifier(probe)
        tasks = [asyncio.create_task(v.check("bob@ours.test")) for _ in range(5)]
        tasks.append(asyncio.create_task(v.check("boom@ours.test")))
        await asyncio.sleep(0)
        gate.set()
        return list(await asyncio.gather(*tasks))

    results = asyncio.run(run())
    assert results == [None] * 5 + [replies.UNVERIFIED_RECIPIENT]
    assert calls == 2


# -- the session -------------------------------------------------------------------------------------
def config(**kw: object) -> SessionConfig:
    return SessionConfig(
        hostname="mx.test",
        max_message_size=2000,
        max_recipients=5,
        networks=(ipaddress.ip_network("192.0.2.0/24"),),
        relay_domains=frozenset({"ours.test"}),
        **kw,  # type: ignore[arg-type]
    )


def session(peer: Peer = OUTSIDE, **kw: object) -> Session:
    s = Session(config(**kw), peer)
    s.start()
    s.receive_data(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
    return s


def test_unlisted_relay_recipient_gets_550_511_from_any_client() -> None:
    listed = {"bob@ours.test"}

    def check(address: str) -> Reply | None:
        return None if address in listed else replies.UNKNOWN_RELAY_RECIPIENT

    for peer in (OUTSIDE, INSIDE):
        s = session(peer, recipient_check=check)
        assert s.receive_data(b"RCPT TO:<carol@ours.test>\r\n") == [
            Send(b"550 5.1.1 Recipient address rejected: User unknown in relay recipient table\r\n")
        ]
        assert s.receive_data(b"RCPT TO:<bob@ours.test>\r\n") == [Send(b"250 2.1.5 Ok\r\n")]
    # a trusted client's mail to other domains is not looked up
    s = session(INSIDE, recipient_check=check)
    assert s.receive_data(b"RCPT TO:<x@elsewhere.test>\r\n") == [Send(b"250 2.1.5 Ok\r\n")]


def test_verification_waits_for_the_verdict() -> None:
    s = session(verify_recipients=True)
    assert s.receive_data(b"RCPT TO:<gone@ours.test>\r\nRCPT TO:<bob@ours.test>\r\n") == [
        VerifyRecipient("gone@ours.test")
    ]
    assert s.state is State.WAIT_VERIFY and s.waiting and s.in_transaction
    # refused, no recipient yet: back to MAIL; the pipelined RCPT is read next, and verified too
    out = s.recipient_verified(replies.UNDELIVERABLE_RECIPIENT)
    assert out == [
        Send(b"550 5.1.1 Recipient address rejected: undeliverable address\r\n"),
        VerifyRecipient("bob@ours.test"),
    ]
    assert [n.text for n in s.take_notes()] == [
        "NOQUEUE: reject: RCPT from unknown[203.0.113.9]: 550 5.1.1 <gone@ours.test>: Recipient address "
        "rejected: undeliverable address; from=<a@client.test> to=<gone@ours.test> proto=ESMTP helo=<client.test>"
    ]
    assert s.recipient_verified(None) == [Send(b"250 2.1.5 Ok\r\n")]
    assert s.state in (State.RCPT,)
    assert s.receive_data(b"RCPT TO:<later@ours.test>\r\n") == [VerifyRecipient("later@ours.test")]
    assert s.recipient_verified(replies.UNVERIFIED_RECIPIENT) == [
        Send(b"450 4.1.1 Recipient address rejected: unverified address, try again later\r\n")
    ]
    assert s.state in (State.RCPT,)  # bob is still in
    s.receive_data(b"DATA\r\n")
    [tx] = s.receive_data(b"x\r\n.\r\n")
    assert isinstance(tx, Transaction)
    assert tx.recipients == (Recipient("bob@ours.test"),) and tx.trusted is False


def test_trusted_clients_are_not_verified() -> None:
    s = session(INSIDE, verify_recipients=True)
    assert s.receive_data(b"RCPT TO:<bob@ours.test>\r\n") == [Send(b"250 2.1.5 Ok\r\n")]
    s.receive_data(b"DATA\r\n")
    [tx] = s.receive_data(b"x\r\n.\r\n")
    assert isinstance(tx, Transaction) and tx.trusted is True


@pytest.mark.parametrize("trusted", [True, False])
def test_envelope_trusted_round_trip(trusted: bool) -> None:
    env = Envelope(id="Q", sender="a@b.test", recipients=[Recipient("c@d.test")], trusted=trusted)
    raw = env.to_json()
    assert ('"trusted":true' in raw) is trusted
    assert Envelope.from_json(raw).trusted is trusted
    assert Envelope.from_json(raw.replace(',"trusted":true', "")).trusted is False  # absent = False


def test_a_waiter_whose_prober_went_away_asks_itself() -> None:
    async def run() -> Reply | None:
        started = asyncio.Event()
        calls = 0

        async def probe(address: str) -> Probe:
            nonlocal calls
            calls += 1
            if calls == 1:
                started.set()
                await asyncio.sleep(3600)  # the first prober's connection is cut meanwhile
            return Probe(Verdict.INVALID, "550")

        v = Verifier(probe)
        first = asyncio.create_task(v.check("bob@ours.test"))
        await started.wait()
        second = asyncio.create_task(v.check("bob@ours.test"))
        await asyncio.sleep(0)
        first.cancel()
        return await asyncio.wait_for(second, 5)

    assert asyncio.run(run()) == replies.UNDELIVERABLE_RECIPIENT
