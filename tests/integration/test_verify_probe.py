"""ingress/verify.smtp_probe over real TCP on loopback: the sans-IO client driven by asyncio streams
against scripted servers, for the answers that must stay "could not tell" (450), never 550 or 250."""

from __future__ import annotations

import asyncio

import pytest

from common.mx import AsyncMXResolver, make_async_resolver
from ingress.verify import Probe, Verdict, smtp_probe

EHLO = b"250-mx.test\r\n250 PIPELINING\r\n"


async def probe_against(script: dict[bytes, bytes], address: str = "bob@ours.test") -> tuple[Probe, list[bytes]]:
    """Run a server answering each command verb from ``script`` (greeting under b""), probe it."""
    heard: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(script.get(b"", b"220 mx.test ESMTP\r\n"))
        while line := await reader.readline():
            heard.append(line.rstrip())
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper()
            writer.write(script.get(verb, b"250 2.0.0 Ok\r\n"))
            await writer.drain()
            if verb == b"QUIT":
                break
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        # no DNS server needed: a literal next hop is never looked up
        resolver = AsyncMXResolver(make_async_resolver([("127.0.0.1", 9)], timeout=0.2))
        got = await smtp_probe(
            address, destination=f"[127.0.0.1]:{port}", port=25, helo="mtaq.test", timeout=10.0, resolver=resolver
        )
    return got, heard


@pytest.mark.parametrize(
    ("script", "verdict", "says"),
    [
        ({b"EHLO": EHLO}, Verdict.VALID, "said 250 2.0.0 Ok"),
        ({b"EHLO": EHLO, b"RCPT": b"550 5.1.1 no such user\r\n"}, Verdict.INVALID, "said 550 5.1.1 no such user"),
        ({b"EHLO": EHLO, b"RCPT": b"450 4.2.0 greylisted\r\n"}, Verdict.UNKNOWN, "said 450 4.2.0 greylisted"),
        # a next hop that refuses the null sender cannot tell us about the recipient: 450, not 550
        ({b"EHLO": EHLO, b"MAIL": b"550 5.7.1 no bounces\r\n"}, Verdict.UNKNOWN, "said to MAIL FROM:<>: 550 5.7.1"),
        ({b"": b"554 5.3.2 go away\r\n"}, Verdict.UNKNOWN, "refused to talk to me: 554 5.3.2 go away"),
        # a 5xx to EHLO: HELO, as RFC 5321 §4.1.4 says
        ({b"EHLO": b"502 5.5.1 what\r\n"}, Verdict.VALID, "said 250"),
    ],
)
def test_probe_verdicts(script: dict[bytes, bytes], verdict: Verdict, says: str) -> None:
    got, heard = asyncio.run(probe_against(script))
    assert got.verdict is verdict, got
    assert says in got.detail, got
    assert not any(line.startswith(b"DATA") for line in heard)  # a probe never sends a message
    if verdict is not Verdict.UNKNOWN:
        assert heard[-3:] == [b"MAIL FROM:<>", b"RCPT TO:<bob@ours.test>", b"QUIT"]


def test_a_utf8_address_needs_smtputf8_from_the_next_hop() -> None:
    got, heard = asyncio.run(probe_against({b"EHLO": EHLO}, "jörg@ours.test"))
    assert got.verdict is Verdict.UNKNOWN and "does not offer SMTPUTF8" in got.detail
    assert not any(line.startswith(b"MAIL") for line in heard)
    offered = {b"EHLO": b"250-mx.test\r\n250 SMTPUTF8\r\n"}
    got, heard = asyncio.run(probe_against(offered, "jörg@ours.test"))
    assert got.verdict is Verdict.VALID
    assert b"MAIL FROM:<> SMTPUTF8" in heard and "RCPT TO:<jörg@ours.test>".encode() in heard
