"""Recipient verification at RCPT time (Postfix's reject_unverified_recipient), for the recipients
of relay domains: ask the next hop ``MAIL FROM:<>`` / ``RCPT TO:<addr>`` / ``QUIT`` and cache what it
said. A 2xx accepts, a 5xx refuses (550 5.1.1), and anything else -- a 4xx, no answer, no address
to ask -- is ``450 4.1.1``: never accepted because we could not tell.

The next hop is the relayhost when one is set (as the workers deliver), else the domain's MX hosts
(or its address records), resolved here with dnspython: the ingress does not import the worker.
The cache lives in the process, like the rest of the ingress's state; answers expire after
``positive_ttl`` / ``negative_ttl`` (Postfix's refresh times: 7 days, 3 hours) and a temporary
failure after ``TEMPFAIL_TTL``, so that a dead next hop is not asked again on every RCPT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

import dns.asyncresolver
import dns.exception
import dns.resolver

from common.smtp.hostport import parse_hostport
from ingress import replies
from ingress.replies import Reply

__all__ = ["TEMPFAIL_TTL", "Probe", "Verdict", "Verifier", "next_hops", "smtp_probe"]

log = logging.getLogger("mtaq.ingress")

# A next hop that could not be asked is asked again after this long, not on every RCPT.
TEMPFAIL_TTL = 60.0
# Addresses remembered per process; the oldest go first.
MAX_CACHED = 100_000
# MX hosts asked before giving up with 450 (each may have several addresses: the first answers).
MAX_HOPS = 2


class Verdict(str, Enum):
    VALID = "valid"
    INVALID = "invalid"  # the next hop refused the recipient (5xx)
    UNKNOWN = "unknown"  # no definite answer


@dataclass(frozen=True, slots=True)
class Probe:
    verdict: Verdict
    detail: str  # what the next hop said, or why it could not be asked (for the log)


ProbeFn = Callable[[str], Awaitable[Probe]]


class Verifier:
    def __init__(
        self,
        probe: ProbeFn,
        *,
        positive_ttl: float = 7 * 86400.0,
        negative_ttl: float = 3 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe = probe
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, Probe]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Probe]] = {}

    def _ttl(self, verdict: Verdict) -> float:
        return {
            Verdict.VALID: self.positive_ttl,
            Verdict.INVALID: self.negative_ttl,
            Verdict.UNKNOWN: TEMPFAIL_TTL,
        }[verdict]

    async def result(self, address: str) -> Probe:
        """The cached answer for ``address``, else one probe (shared by concurrent askers)."""
        key = address.lower()
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._inflight.get(key)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise  # we are the one being cancelled
            # the session that was probing went away (its task cancelled): ask ourselves
            return await self.result(address)
        fut: asyncio.Future[Probe] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            try:
                got = await self.probe(address)
            except Exception as e:  # a bug in the probe must not accept mail, nor lose the session
                log.exception("verifying <%s> failed", address)
                got = Probe(Verdict.UNKNOWN, f"probe failed: {type(e).__name__}")
            self._cache[key] = (self.clock() + self._ttl(got.verdict), got)
            self._cache.move_to_end(key)
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
            fut.set_result(got)
            return got
        finally:
            del self._inflight[key]
            if not fut.done():
                fut.cancel()

    async def check(self, address: str) -> Reply | None:
        """None to accept ``address``, else the reply: 550 5.1.1 refused by the next hop, 450 4.1.1
        when it could not tell."""
        got = await self.result(address)
        if got.verdict is Verdict.VALID:
            return None
        log.info("recipient <%s> %s by verification: %s", address, got.verdict.value, got.detail)
        return replies.UNDELIVERABLE_RECIPIENT if got.verdict is Verdict.INVALID else replies.UNVERIFIED_RECIPIENT


# -- the probe over SMTP -----------------------------------------------------------------------------
async def next_hops(
    address: str, *, relayhost: str, port: int, resolver: dns.asyncresolver.Resolver
) -> list[tuple[str, int]]:
    """Where to ask about ``address``: the relayhost, else the addresses of the MX hosts (best
    first, at most MAX_HOPS hosts) or of the domain itself when it has no MX, all looked up with
    ``resolver`` (the workers' DNS). Empty when DNS gives no answer."""
    if relayhost:
        host, hop_port = parse_hostport(relayhost, port)
        return [(host, hop_port)]
    domain = address.rpartition("@")[2].removesuffix(".")
    try:
        answer = await resolver.resolve(domain, "MX")
        mx = sorted((r.preference, str(r.exchange).rstrip(".")) for r in answer)
        hosts = [h for _, h in mx if h][:MAX_HOPS]
    except dns.resolver.NoAnswer:
        hosts = [domain]
    except (dns.exception.DNSException, OSError):
        return []
    out: list[tuple[str, int]] = []
    for host in hosts:
        for rdtype in ("A", "AAAA"):
            with contextlib.suppress(dns.exception.DNSException, OSError):
                out += [(str(r.address), port) for r in await resolver.resolve(host, rdtype)]
    return out


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        raw = await reader.readline()
        if not raw.endswith(b"\n") or len(raw) < 4 or not raw[:3].isdigit():
            raise ConnectionError(f"bad reply line {raw[:80]!r}")
        lines.append(raw[4:].decode("utf-8", "replace").strip())
        if raw[3:4] != b"-":
            return int(raw[:3]), " ".join(lines)[:300]


async def _ask(host: str, port: int, address: str, helo: str) -> Probe:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        code, text = await _reply(reader)
        if code != 220:
            return Probe(Verdict.UNKNOWN, f"{host}:{port} greeted {code} {text}")

        async def cmd(line: str) -> tuple[int, str]:
            writer.write(line.encode("utf-8") + b"\r\n")
            await writer.drain()
            return await _reply(reader)

        code, text = await cmd(f"EHLO {helo}")
        utf8 = code == 250 and "SMTPUTF8" in text.upper().split()
        if code != 250:
            code, text = await cmd(f"HELO {helo}")
            if code != 250:
                return Probe(Verdict.UNKNOWN, f"{host}:{port} said to HELO: {code} {text}")
        if not address.isascii() and not utf8:
            return Probe(Verdict.UNKNOWN, f"{host}:{port} does not offer SMTPUTF8")
        code, text = await cmd("MAIL FROM:<>" + (" SMTPUTF8" if not address.isascii() else ""))
        if code != 250:
            return Probe(Verdict.UNKNOWN, f"{host}:{port} said to MAIL FROM:<>: {code} {text}")
        code, text = await cmd(f"RCPT TO:<{address}>")
        with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
            await cmd("QUIT")
        said = f"{host}:{port} said {code} {text}"
        if 200 <= code < 300:
            return Probe(Verdict.VALID, said)
        return Probe(Verdict.INVALID if 500 <= code < 600 else Verdict.UNKNOWN, said)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def smtp_probe(
    address: str, *, relayhost: str, port: int, helo: str, timeout: float, resolver: dns.asyncresolver.Resolver
) -> Probe:
    """Ask the next hop about ``address``, within ``timeout`` seconds in all."""
    try:
        async with asyncio.timeout(timeout):
            hops = await next_hops(address, relayhost=relayhost, port=port, resolver=resolver)
            if not hops:
                return Probe(Verdict.UNKNOWN, "no next hop found in DNS")
            last = Probe(Verdict.UNKNOWN, "no next hop answered")
            for host, hop_port in hops:
                try:
                    last = await _ask(host, hop_port, address, helo)
                except (OSError, ConnectionError, asyncio.IncompleteReadError) as e:
                    last = Probe(Verdict.UNKNOWN, f"{host}:{hop_port}: {e or type(e).__name__}")
                    continue
                if last.verdict is not Verdict.UNKNOWN:
                    return last
            return last
    except TimeoutError:
        return Probe(Verdict.UNKNOWN, f"no answer within {timeout:g} s")
