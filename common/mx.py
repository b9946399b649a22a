"""Where to deliver mail for a destination: MX resolution (RFC 5321 §5.1, RFC 7505 null MX).

One core and two fronts, so that the workers and the ingress's recipient verification resolve a
destination alike: the rules (``MXRules.plan``, with the pure ``order_mx``; the destination syntax
is common/smtp/hostport.py) ask their DNS questions by yielding them and read the answers sent
back, doing no IO themselves; ``MXResolver`` answers them with a blocking dnspython resolver (the
workers), ``AsyncMXResolver`` with an asyncio one (the ingress's event loop). Errors are one
exception, ``DnsError``, carrying the enhanced status code (RFC 3463) and a Postfix-style
diagnostic; its ``state`` follows from the code: BOUNCED (5.x.x) or DEFERRED (4.x.x, try again later).

The outcomes, following Postfix where the RFC leaves a choice:

====================================  ===========================================================
MX records                            sorted by preference, equal preferences shuffled, deduped
no MX record (NOERROR/NODATA)         implicit MX: the domain's own A/AAAA at preference 0
null MX (``0 .``, RFC 7505)           bounced 5.1.10
domain NXDOMAIN                       bounced 5.1.2
SERVFAIL, timeout, no server answers  deferred 4.4.3
an MX host without addresses          skipped; if every host fails: deferred if any failure was
                                      transient, else bounced 5.4.4 (unable to route)
an MX host that is an IP address      skipped as malformed (as Postfix); alone -> bounced 5.4.4
an MX host that is us (its name, or   hosts at its preference and below are dropped (Postfix's
an address we listen on)              rule); nothing better left -> bounced 5.4.6 loop
``[host]``, ``[host]:port``           no MX lookup: the host's A/AAAA, or the IP literal itself
====================================  ===========================================================

Loop detection applies to MX (and implicit MX) answers only, not to ``[host]`` literals: as in
Postfix, a literal next hop on our own address (a content filter at ``[127.0.0.1]:10025``, a
test sink) is an operator's explicit choice, and an address comparison without ports cannot tell
it from a loop.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from common.envelope import RcptState, outcome_of
from common.smtp.hostport import parse_destination, split_hostport

__all__ = [
    "MAX_ADDRESSES",
    "AsyncMXResolver",
    "DnsError",
    "MXResolver",
    "MXRules",
    "Plan",
    "Query",
    "Target",
    "interface_addresses",
    "local_addresses",
    "make_async_resolver",
    "make_resolver",
    "order_mx",
    "run_plan",
]

MAX_ADDRESSES = 5
"""Addresses tried per delivery attempt (Postfix ``smtp_mx_address_limit``)."""


class DnsError(Exception):
    """A destination that cannot be resolved: ``dsn`` is the RFC 3463 status, ``state`` what it
    means for the recipients, BOUNCED (5.x.x: it will not resolve to a mail server) or DEFERRED
    (4.x.x: name service trouble that may pass)."""

    def __init__(self, dsn: str, text: str) -> None:
        super().__init__(f"{dsn} {text}")
        self.dsn = dsn
        self.text = text

    @property
    def state(self) -> RcptState:
        return outcome_of(self.dsn)


@dataclass(frozen=True)
class Target:
    """One address to try, in order: ``hostname`` is the MX host name (or the literal)."""

    hostname: str
    ip: str
    port: int
    preference: int

    def __str__(self) -> str:
        """Postfix's ``host[ip]:port``, as used in logs and in RecipientStatus.relay."""
        return f"{self.hostname}[{self.ip}]:{self.port}"


def order_mx(records: Sequence[tuple[int, str]], rng: random.Random) -> list[str]:
    """MX host names in the order to try them (RFC 5321 §5.1).

    Lower preference first; hosts of equal preference are shuffled so that senders spread their
    load; a host listed twice is tried once, at its best preference. Names are compared without
    case or trailing dot and returned as given (first spelling seen at the best preference).
    """
    best: dict[str, tuple[int, str]] = {}
    for pref, host in records:
        key = _name_key(host)
        if key not in best or pref < best[key][0]:
            best[key] = (pref, host)
    by_pref: dict[int, list[str]] = {}
    for pref, host in best.values():
        by_pref.setdefault(pref, []).append(host)
    ordered: list[str] = []
    for pref in sorted(by_pref):
        level = by_pref[pref]
        rng.shuffle(level)
        ordered.extend(level)
    return ordered


def make_resolver(servers: Sequence[tuple[str, int]], timeout: float = 5.0) -> dns.resolver.Resolver:
    """A caching resolver: the system's (``/etc/resolv.conf``) when ``servers`` is empty, else
    exactly those ``(ip, port)`` servers. ``timeout`` is the wait for one server; one lookup gives
    up after ``timeout`` times the number of servers. Answers, NXDOMAIN and NODATA included, are
    cached to their TTL (negative answers to the SOA minimum)."""
    return _configure(dns.resolver.Resolver(configure=not servers), servers, timeout)


def make_async_resolver(servers: Sequence[tuple[str, int]], timeout: float = 5.0) -> dns.asyncresolver.Resolver:
    """``make_resolver``'s twin for an event loop (the ingress's recipient verification)."""
    return _configure(dns.asyncresolver.Resolver(configure=not servers), servers, timeout)


_R = TypeVar("_R", bound=dns.resolver.BaseResolver)


def _configure(resolver: _R, servers: Sequence[tuple[str, int]], timeout: float) -> _R:
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
    resolver.timeout = timeout
    resolver.lifetime = timeout * max(1, len(resolver.nameservers))
    resolver.cache = dns.resolver.LRUCache()
    return resolver


@dataclass(frozen=True, slots=True)
class Query:
    """One DNS question the rules ask; the answer is the records' text (``10 mx.a.test.``,
    ``127.0.0.2``), or a dnspython exception (NXDOMAIN, NoAnswer, a timeout...) thrown in."""

    name: dns.name.Name
    rdtype: dns.rdatatype.RdataType


Plan = Generator[Query, list[str], list[Target]]
"""The rules at work on one destination: they yield the questions, are sent the answers, and
return the targets (or raise DnsError). The fronts below do the asking."""


class MXRules:
    """The rules of MX resolution, without IO: ``plan`` says what to ask and what the answers
    mean. ``MXResolver`` (blocking, the workers) and ``AsyncMXResolver`` (asyncio, the ingress's
    recipient verification) answer its questions, so both sides resolve alike."""

    def __init__(
        self,
        *,
        local_names: Iterable[str] = (),
        local_ips: Iterable[str] = (),
        max_addresses: int = MAX_ADDRESSES,
        rng: random.Random | None = None,
    ) -> None:
        self.local_names = frozenset(_name_key(n) for n in local_names if n.strip())
        self.local_ips = frozenset(_ip_key(a) for a in local_ips if a.strip())
        self.max_addresses = max_addresses
        self.rng = rng if rng is not None else random.Random()

    def plan(self, destination: str, port: int) -> Plan:
        """Addresses to try for ``destination``, best first, at most ``max_addresses``.

        Raises DnsError (bounced or deferred); never returns an empty list.
        """
        try:
            host, port, literal = parse_destination(destination, port)
        except ValueError as e:
            # A configuration mistake (transport map, relayhost): defer until someone fixes it.
            raise DnsError("4.3.5", f"mail system configuration error: {e}") from None
        if literal:
            return (yield from self._literal(host, port))
        return (yield from self._mx(host, port))

    # -- literal next hop: no MX lookup

    def _literal(self, host: str, port: int) -> Plan:
        if _is_ip(host):
            return [Target(host, str(ipaddress.ip_address(host)), port, 0)]
        found = yield from self._addresses(host)
        if found.ips:
            return [Target(_display(host), ip, port, 0) for ip in found.ips[: self.max_addresses]]
        raise found.error(host)

    # -- MX lookup

    def _mx(self, domain: str, port: int) -> Plan:
        qname = self._qname(domain, "5.1.2")
        try:
            answer = yield Query(qname, dns.rdatatype.MX)
        except dns.resolver.NoAnswer:
            return (yield from self._implicit_mx(domain, port))
        except dns.resolver.NXDOMAIN:
            raise DnsError("5.1.2", _host_not_found(domain, "MX")) from None
        except dns.exception.DNSException as e:  # SERVFAIL/REFUSED everywhere, timeout, ...
            raise DnsError("4.4.3", _try_again(domain, "MX", e)) from None
        records = [_mx_record(text) for text in answer]
        real = [(pref, host) for pref, host in records if host not in ("", ".")]
        if not real:
            # RFC 7505 §3: "0 ." says the domain accepts no mail at all.
            raise DnsError("5.1.10", f"Domain {domain} does not accept mail (nullMX)")
        return (yield from self._resolve_hosts(domain, order_mx(real, self.rng), dict(_pref_map(real)), port))

    def _implicit_mx(self, domain: str, port: int) -> Plan:
        """RFC 5321 §5.1: no MX records -> the domain itself is the sole host, preference 0."""
        found = yield from self._addresses(domain)
        if not found.ips:
            raise found.error(domain)
        targets = [Target(_display(domain), ip, port, 0) for ip in found.ips]
        if self._is_self(domain, targets):
            raise DnsError("5.4.6", f"mail for {domain} loops back to myself")
        return targets[: self.max_addresses]

    def _resolve_hosts(self, domain: str, hosts: list[str], prefs: dict[str, int], port: int) -> Plan:
        targets: list[Target] = []
        failures: list[tuple[str, _Addresses]] = []
        self_pref: int | None = None
        for host in hosts:
            pref = prefs[_name_key(host)]
            if self_pref is not None and pref >= self_pref:
                break  # Postfix: drop the MX hosts that are no better than us
            if len(targets) >= self.max_addresses and pref > targets[-1].preference:
                break  # enough addresses, and this preference level is complete (loop check done)
            if _name_key(host) in self.local_names:
                self_pref = pref
                continue
            if _is_ip(host.strip("[]")):
                # RFC 5321 §5.1 / RFC 1035: an MX names a host; Postfix refuses a numeric one too
                failures.append((host, _Addresses(host, numeric=True)))
                continue
            found = yield from self._addresses(host)
            if not found.ips:
                failures.append((host, found))
                continue
            host_targets = [Target(host, ip, port, pref) for ip in found.ips]
            if self._is_self(host, host_targets):
                self_pref = pref
                continue
            targets.extend(host_targets)
        if self_pref is not None:
            targets = [t for t in targets if t.preference < self_pref]
            if not targets:
                # A better MX whose address could not be looked up this time may still be there:
                # that is "try later" (4.4.3), not a loop to bounce.
                better = [(h, f) for h, f in failures if f.transient and prefs[_name_key(h)] < self_pref]
                if better:
                    host, found = better[0]
                    raise found.error(host)
                raise DnsError("5.4.6", f"mail for {domain} loops back to myself")
        if targets:
            return targets[: self.max_addresses]
        transient = [(h, f) for h, f in failures if f.transient]
        if transient:
            host, found = transient[0]
            raise found.error(host)
        detail = "; ".join(found.error(host).text for host, found in failures[:3])
        raise DnsError("5.4.4", f"Unable to route: no MX host for {domain} has an address ({detail})")

    # -- helpers

    def _qname(self, name: str, dsn: str) -> dns.name.Name:
        try:
            return dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            raise DnsError(dsn, f"Host or domain name not found: bad name {name!r} ({e})") from None

    def _addresses(self, host: str) -> Generator[Query, list[str], _Addresses]:
        """A then AAAA of ``host``; one failing family does not spoil the other."""
        qname = self._qname(host, "5.4.4")
        out = _Addresses(host)
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = yield Query(qname, rdtype)
            except dns.resolver.NoAnswer:
                out.nodata = True
                continue
            except dns.resolver.NXDOMAIN:
                out.nxdomain = True
                break  # the name does not exist: no point asking for AAAA
            except dns.exception.DNSException as e:
                out.errors.append(f"{dns.rdatatype.to_text(rdtype)}: {_reason(e)}")
                continue
            for text in answer:
                ip = str(ipaddress.ip_address(text))
                if ip not in out.ips:
                    out.ips.append(ip)
        return out

    def _is_self(self, host: str, targets: Sequence[Target]) -> bool:
        if _name_key(host) in self.local_names:
            return True
        return any(_ip_key(t.ip) in self.local_ips for t in targets)


def run_plan(plan: Plan, ask: Callable[[Query], list[str]]) -> list[Target]:
    """Drive ``plan`` to its end with ``ask`` answering each question (a DNSException it raises
    goes to the rules, which decide what it means)."""
    try:
        query = next(plan)
        while True:
            try:
                records = ask(query)
            except dns.exception.DNSException as e:
                query = plan.throw(e)
            else:
                query = plan.send(records)
    except StopIteration as done:
        targets: list[Target] = done.value
        return targets


class MXResolver(MXRules):
    """The blocking front: a worker's conversations resolve their destinations with it."""

    def __init__(self, resolver: dns.resolver.Resolver, **rules: Any) -> None:
        super().__init__(**rules)
        self.resolver = resolver

    def targets(self, destination: str, port: int) -> list[Target]:
        """Addresses to try for ``destination``, best first; raises DnsError, never returns []."""
        return run_plan(self.plan(destination, port), self._ask)

    def _ask(self, query: Query) -> list[str]:
        return _texts(self.resolver.resolve(query.name, query.rdtype, search=False))


class AsyncMXResolver(MXRules):
    """The asyncio front, for the ingress's event loop (recipient verification): the same rules."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, **rules: Any) -> None:
        super().__init__(**rules)
        self.resolver = resolver

    async def targets(self, destination: str, port: int) -> list[Target]:
        """Addresses to try for ``destination``, best first; raises DnsError, never returns []."""
        plan = self.plan(destination, port)
        try:
            query = next(plan)
            while True:
                try:
                    records = _texts(await self.resolver.resolve(query.name, query.rdtype, search=False))
                except dns.exception.DNSException as e:
                    query = plan.throw(e)
                else:
                    query = plan.send(records)
        except StopIteration as done:
            targets: list[Target] = done.value
            return targets


def _texts(answer: dns.resolver.Answer) -> list[str]:
    return [rr.to_text() for rr in answer]


def _mx_record(text: str) -> tuple[int, str]:
    """``10 mx.a.test.`` -> ``(10, "mx.a.test")``; the null MX ``0 .`` keeps its ``.``."""
    pref, _, exchange = text.strip().partition(" ")
    exchange = exchange.strip()
    return int(pref), exchange if exchange == "." else exchange.removesuffix(".")


class _Addresses:
    """What the A/AAAA lookups of one host found."""

    def __init__(self, host: str, *, numeric: bool = False) -> None:
        self.host = host
        self.numeric = numeric  # an MX record naming an IP address: malformed
        self.ips: list[str] = []
        self.nxdomain = False
        self.nodata = False
        self.errors: list[str] = []

    @property
    def transient(self) -> bool:
        return bool(self.errors) and not self.nxdomain

    def error(self, host: str) -> DnsError:
        if self.numeric:
            return DnsError("5.4.4", f"MX host {host} is an IP address, not a host name (malformed MX record)")
        if self.transient:
            reasons = ", ".join(self.errors)
            return DnsError("4.4.3", f"Host or domain name lookup failed for {host}: {reasons}")
        if self.nxdomain:
            return DnsError("5.4.4", _host_not_found(host, "A"))
        return DnsError(
            "5.4.4",
            f"Host or domain name not found. Name service error for name={host} type=AAAA: "
            "Host found but no data record of requested type",
        )


def local_addresses(listen: str) -> list[str]:
    """The addresses we receive mail on, for loop detection (Postfix inet_interfaces): the listen
    address when it is one, every interface address when it is a wildcard or a name."""
    try:
        host = split_hostport(listen, 0).host
    except ValueError:
        host = ""
    if _is_ip(host) and not ipaddress.ip_address(host).is_unspecified:
        return [str(ipaddress.ip_address(host))]
    return interface_addresses()


def interface_addresses() -> list[str]:
    """Every IPv4 and IPv6 address of this host's interfaces (Linux: SIOCGIFADDR, /proc)."""
    found: list[str] = []
    try:
        import fcntl
        import socket
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue  # no IPv4 address on it
                found.append(socket.inet_ntoa(packed[20:24]))
    except (ImportError, OSError):
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                raw = line.split()[0]
                found.append(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    except (OSError, ValueError):
        pass
    return list(dict.fromkeys(found))


def _pref_map(records: Iterable[tuple[int, str]]) -> Iterable[tuple[str, int]]:
    best: dict[str, int] = {}
    for pref, host in records:
        key = _name_key(host)
        best[key] = min(pref, best.get(key, pref))
    return best.items()


def _host_not_found(name: str, rdtype: str) -> str:
    return f"Host or domain name not found. Name service error for name={name} type={rdtype}: Host not found"


def _try_again(name: str, rdtype: str, e: Exception) -> str:
    return f"Name service error for name={name} type={rdtype}: {_reason(e)}"


def _reason(e: Exception) -> str:
    if isinstance(e, dns.exception.Timeout):
        return "timed out, try again"
    if isinstance(e, dns.resolver.NoNameservers):
        return "server failure, try again"
    return f"{type(e).__name__}, try again"


def _name_key(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _display(name: str) -> str:
    return name.strip().rstrip(".")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _ip_key(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return text.strip().lower()
