"""DANE for SMTP (RFC 7672): the TLSA records of an MX host, believed only when DNSSEC says so.

mtaq validates no signatures itself: ``dns_servers`` must be a validating resolver the operator
trusts (unbound on loopback, docs/outbound-tls.md), and an answer counts as secure only when that
resolver set the AD bit (RFC 4035 §3.2.3; RFC 7672 §2.1.1). ``enable_dnssec`` makes our one
resolver ask with the DO bit; the MX answers the MX resolver got come from the same resolver's
cache, so asking again for their AD bit costs no query.

Per MX host (``TLSALookup.requirement``):

=============================================  ==============================================
secure TLSA answer with usable records          DANE: STARTTLS and a matching certificate, or skip
secure answer, no usable record                 no DANE for that host (RFC 7672 §2.2)
insecure answer (no AD), NXDOMAIN, NODATA       no DANE for that host
lookup fails (SERVFAIL, timeout) and the        the host is skipped: an attacker must not be
host's address records are secure              able to turn DANE off by breaking the lookup
MX RRset (or the implicit MX's A) insecure      no DANE for the whole destination (§2.2.1)
=============================================  ==============================================
"""

from __future__ import annotations

import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver

from worker.tlspolicy import TLSA, Failure, Requirement

__all__ = ["TLSALookup", "enable_dnssec", "is_secure"]

EDNS_PAYLOAD = 1232
"""The DNS flag day 2020 recommendation: no fragmented UDP answers, TCP beyond."""


def enable_dnssec(resolver: dns.resolver.Resolver) -> None:
    """Ask with DO (RFC 3225) and AD (RFC 6840 §5.7) so that a validating resolver reports what
    it validated."""
    resolver.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
    resolver.flags = dns.flags.RD | dns.flags.AD


def _ad(answer: dns.resolver.Answer) -> bool:
    return answer.response is not None and bool(answer.response.flags & dns.flags.AD)


def is_secure(resolver: dns.resolver.Resolver, name: str, rdtype: dns.rdatatype.RdataType) -> bool:
    """Whether the answer for ``name``/``rdtype`` came with AD; False for no answer at all."""
    try:
        return _ad(resolver.resolve(dns.name.from_text(name), rdtype, search=False))
    except dns.exception.DNSException:
        return False


class TLSALookup:
    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.resolver = resolver

    def destination_secure(self, domain: str) -> bool:
        """RFC 7672 §2.2.1: DANE applies only when the MX RRset is secure (or, with no MX, the
        domain's own address records: the implicit MX)."""
        try:
            answer = self.resolver.resolve(dns.name.from_text(domain), dns.rdatatype.MX, search=False)
        except dns.resolver.NoAnswer:
            return is_secure(self.resolver, domain, dns.rdatatype.A)
        except dns.exception.DNSException:
            return False
        return _ad(answer)

    def requirement(self, host: str, port: int, domain: str) -> Requirement | None:
        """DANE's requirement for one MX host, or None when DANE does not apply to it."""
        qname = f"_{port}._tcp.{host.rstrip('.')}"
        try:
            answer = self.resolver.resolve(dns.name.from_text(qname), dns.rdatatype.TLSA, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return None
        except dns.exception.DNSException as e:
            if not is_secure(self.resolver, host.rstrip("."), dns.rdatatype.A):
                return None
            why = f"TLSA lookup for {qname} failed ({type(e).__name__}); the host is DNSSEC-signed"
            return Requirement("dane", True, domain, (), Failure("dnssec-invalid", f"DANE policy of {domain}: {why}"))
        if not _ad(answer):
            return None  # insecure: anyone could have forged it, and anyone could strip it
        records = tuple(TLSA(int(rr.usage), int(rr.selector), int(rr.mtype), bytes(rr.cert)) for rr in answer)
        usable = tuple(r for r in records if r.usable)
        if not usable:
            return None
        return Requirement("dane", True, domain, usable)
