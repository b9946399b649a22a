"""The TLS policies of one destination, put together for its conversations (issue 21).

``TLSGate`` is what the delivery service holds: settings, the trust anchors, the MTA-STS policy
cache and the TLSA lookups, all on the one resolver the MX lookups use. Per job it hands out a
``DestinationTLS``, which the lane (worker/relay.py ``Work``) keeps and its conversations ask:
``require(target)`` before connecting, ``check(req, host, chain)`` after the handshake.
DANE wins over MTA-STS where both apply (RFC 8461 §2).
"""

from __future__ import annotations

import logging
import threading
import time

import dns.resolver
import redis

from common.mx import Target
from common.smtp.hostport import parse_destination
from worker.dane import TLSALookup
from worker.mtasts import MTASTS, PolicyCache, STSPolicy
from worker.tlspolicy import OPPORTUNISTIC, Failure, Requirement, TrustAnchors, check_chain
from worker.tlsrpt import TLSReporter

__all__ = ["DestinationTLS", "TLSGate"]

log = logging.getLogger("mtaq.tls")


class DestinationTLS:
    """What one destination's MX hosts require (DANE per host, looked up on first ask)."""

    def __init__(
        self,
        domain: str,
        anchors: TrustAnchors,
        sts: STSPolicy | None = None,
        dane: TLSALookup | None = None,
        port: int = 25,
        reporter: TLSReporter | None = None,
    ) -> None:
        self.domain = domain
        self.anchors = anchors
        self.sts = sts if sts is not None and sts.mode != "none" else None
        self.dane = dane
        self.port = port
        self.reporter = reporter
        self._dane_memo: dict[str, Requirement | None] = {}
        self._lock = threading.Lock()

    def require(self, target: Target) -> Requirement:
        host = target.hostname.rstrip(".").lower()
        if self.dane is not None:
            with self._lock:
                known = host in self._dane_memo
                found = self._dane_memo.get(host)
            if not known:
                found = self.dane.requirement(host, target.port, self.domain)
                with self._lock:
                    self._dane_memo[host] = found
            if found is not None:
                return found
        sts = self.sts
        if sts is None:
            return OPPORTUNISTIC
        req = Requirement("mta-sts", sts.mode == "enforce", self.domain)
        if not sts.allows(host):
            refusal = req.failure("validation-failure", f"MX host {host} is not in the policy's mx list")
            if req.enforce:
                return Requirement(req.policy, True, self.domain, (), refusal)
            log.info("%s", refusal.text)  # testing: deliver as before, note it
        return req

    def check(self, req: Requirement, hostname: str, chain: list[bytes]) -> Failure | None:
        return check_chain(req, hostname, chain, self.anchors)

    def report(self, req: Requirement, mx_host: str, failure: Failure | None) -> None:
        """A session under ``req`` met it (``failure`` None) or not: counted for TLS-RPT."""
        if self.reporter is None or not req.policy:
            return
        if req.policy == "mta-sts" and self.sts is not None:
            sts = self.sts
            strings = ["version: STSv1", f"mode: {sts.mode}", *(f"mx: {m}" for m in sts.mx), f"max_age: {sts.max_age}"]
        else:
            strings = [f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in req.tlsa]
        self.reporter.record(time.time(), req, mx_host, failure, strings)


class TLSGate:
    """Settings -> per-destination TLS requirements."""

    def __init__(
        self,
        resolver: dns.resolver.Resolver,
        r: redis.Redis,
        *,
        ca_file: str = "",
        mta_sts: bool = True,
        dane: bool = False,
        policy_port: int = 443,
    ) -> None:
        self.resolver = resolver
        self.redis = r
        self.anchors = TrustAnchors(ca_file)
        self.mta_sts = MTASTS(resolver, PolicyCache(r), self.anchors.context(), port=policy_port) if mta_sts else None
        self.dane = TLSALookup(resolver) if dane else None
        self.reporter = TLSReporter(r)

    def destination(self, destination: str, port: int) -> DestinationTLS | None:
        """The policies of ``destination``, or None when none can apply: a literal next hop
        (``[host]``, a relayhost) has no MX to match and no domain to ask."""
        if self.mta_sts is None and self.dane is None:
            return None
        try:
            domain, port, literal = parse_destination(destination, port)
        except ValueError:
            return None
        if literal:
            return None
        domain = domain.rstrip(".").lower()
        sts = self.mta_sts.policy(domain) if self.mta_sts is not None else None
        for failed, error in self.mta_sts.take_failures() if self.mta_sts is not None else []:
            # a policy that could not be fetched is a TLS-RPT failure of its own (RFC 8460 §4.3.2.1)
            self.reporter.record(time.time(), Requirement("mta-sts", True, failed), "", Failure(error.result_type, ""))
        dane = self.dane if self.dane is not None and self.dane.destination_secure(domain) else None
        if sts is None and dane is None:
            return None
        return DestinationTLS(domain, self.anchors, sts, dane, port, self.reporter)
