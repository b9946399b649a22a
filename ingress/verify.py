"""Recipient verification at RCPT time (Postfix's reject_unverified_recipient), for the recipients
of relay domains: ask the next hop ``MAIL FROM:<>`` / ``RCPT TO:<addr>`` / ``QUIT`` and cache what it
said. A 2xx accepts, a 5xx refuses (550 5.1.1), and anything else -- a 4xx, no answer, no address
to ask -- is ``450 4.1.1``: never accepted because we could not tell.

The next hop is found as the workers find it, with the same code: the recipient's route
(common/routing.py: the relayhost, else its domain) resolved by the same MX rules (common/mx.py:
preference order with equal ones shuffled, implicit MX, at most ``max_mx_addresses`` addresses,
the loop check), through their asyncio front since this runs in the ingress's event loop. A
destination the workers would bounce is refused at once with their status (``DNS_REFUSALS``: a
null MX is ``550 5.1.10``, no such domain ``550 5.1.2``, a loop ``550 5.4.6``, no MX host with an
address ``550 5.4.4``); a DNS failure that may pass (4.x.x) is ``450 4.1.1``. The probe itself is
the sans-IO SMTP client (common/smtp/client.py) driven over asyncio streams.

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

from common.envelope import RcptState
from common.mx import AsyncMXResolver, DnsError, Target, make_async_resolver
from common.routing import Router
from common.smtp.client import Client, ClientEvent, Closed, Ready, Refused, TransactionDone
from ingress import replies
from ingress.config import IngressConfig
from ingress.replies import Reply

__all__ = ["DNS_REFUSALS", "TEMPFAIL_TTL", "Probe", "Verdict", "Verifier", "make_verifier", "smtp_probe"]

log = logging.getLogger("mtaq.ingress")

# A next hop that could not be asked is asked again after this long, not on every RCPT.
TEMPFAIL_TTL = 60.0
# Addresses remembered per process; the oldest go first.
MAX_CACHED = 100_000
# One read from a next hop's socket.
READ_SIZE = 65536


class Verdict(str, Enum):
    VALID = "valid"
    INVALID = "invalid"  # the next hop refused the recipient (5xx)
    UNKNOWN = "unknown"  # no definite answer


@dataclass(frozen=True, slots=True)
class Probe:
    verdict: Verdict
    detail: str  # what the next hop said, or why it could not be asked (for the log)
    reply: Reply | None = None  # the refusal to give, when not the verdict's usual one (DNS_REFUSALS)


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
        if got.reply is not None:
            return got.reply
        return replies.UNDELIVERABLE_RECIPIENT if got.verdict is Verdict.INVALID else replies.UNVERIFIED_RECIPIENT


# -- the probe over SMTP -----------------------------------------------------------------------------
# What a refusal by DNS answers at RCPT: the worker would bounce the recipient with that status
# (common/mx.py), so the ingress refuses it now, with the same status. Other 5.x.x from DNS: 5.1.1.
DNS_REFUSALS: dict[str, Reply] = {
    "5.1.10": replies.NULL_MX_RECIPIENT,
    "5.1.2": replies.UNKNOWN_DOMAIN_RECIPIENT,
    "5.4.4": replies.UNROUTABLE_RECIPIENT,
    "5.4.6": replies.LOOPING_RECIPIENT,
}


def make_verifier(config: IngressConfig) -> Verifier:
    """The verifier of an ingress: it asks where the workers deliver, resolved as they resolve it
    (the relayhost, else the MX hosts: common/routing.py, common/mx.py), with the same DNS servers,
    address limit and loop check (our hostname, the addresses we listen on)."""
    resolver = AsyncMXResolver(
        make_async_resolver(config.dns_servers),
        local_names=[config.session.hostname],
        local_ips=config.local_ips,
        max_addresses=config.max_mx_addresses,
    )
    router = Router(config.relayhost)

    async def probe(address: str) -> Probe:
        return await smtp_probe(
            address,
            destination=router.hop(address),
            port=config.smtp_port,
            helo=config.session.hostname,
            timeout=config.verify_timeout,
            resolver=resolver,
        )

    return Verifier(probe, positive_ttl=config.verify_positive_ttl, negative_ttl=config.verify_negative_ttl)


async def smtp_probe(
    address: str, *, destination: str, port: int, helo: str, timeout: float, resolver: AsyncMXResolver
) -> Probe:
    """Ask the next hop of ``destination`` about ``address``, within ``timeout`` seconds in all:
    its addresses in the workers' order, until one gives a definite answer."""
    try:
        async with asyncio.timeout(timeout):
            try:
                targets = await resolver.targets(destination, port)
            except DnsError as e:
                if e.state is RcptState.BOUNCED:
                    return Probe(Verdict.INVALID, str(e), DNS_REFUSALS.get(e.dsn, replies.UNDELIVERABLE_RECIPIENT))
                return Probe(Verdict.UNKNOWN, str(e))
            last = Probe(Verdict.UNKNOWN, "no next hop answered")
            for target in targets:
                try:
                    last = await _ask(target, address, helo)
                except (OSError, ConnectionError) as e:
                    last = Probe(Verdict.UNKNOWN, f"{target}: {e or type(e).__name__}")
                    continue
                if last.verdict is not Verdict.UNKNOWN:
                    return last
            return last
    except TimeoutError:
        return Probe(Verdict.UNKNOWN, f"no answer within {timeout:g} s")


async def _ask(target: Target, address: str, helo: str) -> Probe:
    """One probe with the sans-IO client (common/smtp/client.py): ``MAIL FROM:<>``, ``RCPT TO``,
    ``QUIT``; in plain text, as before (a probe carries no message)."""
    reader, writer = await asyncio.open_connection(target.ip, target.port)
    client = Client(helo, str(target), try_tls=False)
    try:
        event = await _pump(client, reader, writer)
        if not isinstance(event, Ready):
            return Probe(Verdict.UNKNOWN, event.text if isinstance(event, Refused) else f"{target}: no session")
        options = [] if address.isascii() else ["SMTPUTF8"]
        if options and not client.supports("smtputf8"):
            client.quit()
            await _pump(client, reader, writer)
            return Probe(Verdict.UNKNOWN, f"{target} does not offer SMTPUTF8")
        client.start_probe("", [address], options)
        event = await _pump(client, reader, writer)
        if not isinstance(event, TransactionDone):
            return Probe(Verdict.UNKNOWN, f"lost connection with {target} during the probe")
        with contextlib.suppress(OSError, ConnectionError):
            await _pump(client, reader, writer)  # QUIT's reply
        result = event.result
        if result.mail is not None and not result.mail.positive:
            return Probe(Verdict.UNKNOWN, f"{target} said to MAIL FROM:<>: {result.mail}")
        reply = result.replies.get(0)
        if reply is None:
            return Probe(Verdict.UNKNOWN, f"lost connection with {target} during RCPT")
        said = f"{target} said {reply}"
        if reply.positive:
            return Probe(Verdict.VALID, said)
        return Probe(Verdict.INVALID if reply.outcome is RcptState.BOUNCED else Verdict.UNKNOWN, said)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def _pump(client: Client, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> ClientEvent:
    """Write what the client has to say, read until it has something to tell (the asyncio twin of
    worker/smtpclient.py's blocking loop; a broken connection is the client's ``eof``)."""
    while True:
        out = client.data_to_send()
        if out:
            writer.write(out)
            try:
                await writer.drain()
            except (OSError, ConnectionError):
                client.eof()
        event = client.next_event()
        if event is not None:
            return event
        if client.closed:
            return Closed()
        try:
            data = await reader.read(READ_SIZE)
        except (OSError, ConnectionError):
            data = b""
        if data:
            client.receive_data(data)
        else:
            client.eof()
