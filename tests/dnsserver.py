"""A small authoritative DNS server on loopback for tests, built on dnspython's message API.

``ZoneServer`` answers from a dict of records over UDP and TCP on one ephemeral port::

    with ZoneServer({"a.test.": [("MX", "10 mx1.a.test.")], "mx1.a.test.": [("A", "127.0.0.2")]}) as dns:
        resolver = make_resolver([(dns.host, dns.port)], timeout=0.5)

A name that is not in the records gets NXDOMAIN, a name without the asked type NOERROR/NODATA,
both with an SOA in the authority section so that resolvers can cache the negative answer. Names
in ``.servfail`` get SERVFAIL; names in ``.drop`` get no answer at all (the client times out);
an entry ``"name/AAAA"`` limits the fault to one record type. A
CNAME is followed within the records. Answers that do not fit a UDP datagram are truncated (TC) and
the client retries over TCP. Every question is recorded in ``.queries``.

DNSSEC without signatures: names at or under an entry of ``.signed`` ("a.test.") are "signed", and
their answers carry the AD bit when the query asked with DO or AD, as a validating resolver's
would (RFC 4035 §3.2.3, RFC 6840 §5.7); all other answers are insecure (no AD).
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["Query", "ZoneServer"]

Records = dict[str, list[tuple[str, str]]]

_UDP_PLAIN_MAX = 512
"""RFC 1035 §4.2.1: a UDP answer without EDNS is at most 512 octets."""


@dataclass(frozen=True)
class Query:
    name: str  # absolute, lower case: "mx1.a.test."
    rdtype: str  # "A", "MX", ...
    transport: str  # "udp" or "tcp"


def _key(name: str | dns.name.Name) -> dns.name.Name:
    n = name if isinstance(name, dns.name.Name) else dns.name.from_text(name)
    return n.canonicalize()


class ZoneServer:
    """Authoritative answers from ``records``; thread-safe; ``start``/``stop`` or ``with``."""

    def __init__(
        self,
        records: Records | None = None,
        host: str = "127.0.0.1",
        *,
        ttl: int = 60,
        negative_ttl: int = 60,
    ) -> None:
        self.host = host
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.port = 0
        self.servfail: set[str] = set()  # "name" or "name/TYPE"
        self.drop: set[str] = set()
        self.signed: set[str] = set()  # zones whose answers are "validated": AD set (see above)
        self.queries: list[Query] = []
        self.errors: list[Exception] = []  # exceptions raised while answering (should stay empty)
        self._lock = threading.Lock()
        self._records: dict[dns.name.Name, list[dns.rdata.Rdata]] = {}
        self._udp: _UDPServer | None = None
        self._tcp: _TCPServer | None = None
        self._threads: list[threading.Thread] = []
        for name, entries in (records or {}).items():
            for rdtype, text in entries:
                self.add(name, rdtype, text)

    # -- records

    def add(self, name: str, rdtype: str, text: str) -> None:
        """Add one record (``"MX", "10 mx1.a.test."``); relative names in ``text`` end at the root."""
        rdata = dns.rdata.from_text(
            dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text, origin=dns.name.root, relativize=False
        )
        with self._lock:
            self._records.setdefault(_key(name), []).append(rdata)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Forget a name's records of ``rdtype`` (all of them when None)."""
        with self._lock:
            key = _key(name)
            if rdtype is None:
                self._records.pop(key, None)
            else:
                t = dns.rdatatype.from_text(rdtype)
                left = [r for r in self._records.get(key, []) if r.rdtype != t]
                if left:
                    self._records[key] = left
                else:
                    self._records.pop(key, None)

    def query_count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """How many questions matched ``name`` and ``rdtype`` (None matches any)."""
        want = _key(name).to_text() if name is not None else None
        with self._lock:
            return sum(
                1
                for q in self.queries
                if (want is None or q.name == want) and (rdtype is None or q.rdtype == rdtype.upper())
            )

    # -- lifecycle

    def start(self) -> ZoneServer:
        if self._udp is not None:
            return self
        udp, tcp = self._bind()
        self._udp, self._tcp = udp, tcp
        self.port = udp.server_address[1]
        for server in (udp, tcp):
            t = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                daemon=True,
                name=f"zoneserver-{type(server).__name__}",
            )
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for server in (self._udp, self._tcp):
            if server is not None:
                server.shutdown()
                server.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._udp = self._tcp = None
        self._threads = []

    def __enter__(self) -> ZoneServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, as ``make_resolver`` wants it."""
        return (self.host, self.port)

    def _bind(self) -> tuple[_UDPServer, _TCPServer]:
        # UDP first on an ephemeral port, then TCP on the same number; retry if TCP's is taken.
        last: OSError | None = None
        for _ in range(50):
            udp = _UDPServer((self.host, 0), _UDPHandler, self)
            try:
                tcp = _TCPServer((self.host, udp.server_address[1]), _TCPHandler, self)
            except OSError as e:
                udp.server_close()
                last = e
                continue
            return udp, tcp
        raise RuntimeError(f"no port free for both UDP and TCP on {self.host}: {last}")

    # -- answering

    def respond(self, wire: bytes, transport: str) -> bytes | None:
        """The wire answer to one wire query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        try:
            return self._respond(query, transport)
        except Exception as e:  # a bug here must fail the test fast, not look like a timeout
            self.errors.append(e)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()

    def _respond(self, query: dns.message.Message, transport: str) -> bytes | None:
        if not query.question:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        qname = question.name.canonicalize()
        rdtype = question.rdtype
        with self._lock:
            self.queries.append(Query(qname.to_text(), dns.rdatatype.to_text(rdtype), transport))
            drop = _faults(self.drop)
            servfail = _faults(self.servfail)
            signed = [_key(z) for z in self.signed]
            records = {k: list(v) for k, v in self._records.items()}
        if _hit(drop, qname, rdtype):
            return None
        response = dns.message.make_response(query)
        if _hit(servfail, qname, rdtype):
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        response.flags |= dns.flags.AA
        self._answer(response, qname, rdtype, records, servfail, drop)
        asked = bool(query.flags & dns.flags.AD) or bool(query.ednsflags & dns.flags.DO)
        if asked and any(qname.is_subdomain(zone) for zone in signed):
            response.flags |= dns.flags.AD
        if transport == "udp":
            limit = query.payload if query.edns >= 0 else _UDP_PLAIN_MAX
            try:
                return response.to_wire(max_size=limit)
            except dns.exception.TooBig:
                truncated = dns.message.make_response(query)
                truncated.flags |= dns.flags.AA | dns.flags.TC
                return truncated.to_wire()
        return response.to_wire()

    def _answer(
        self,
        response: dns.message.Message,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        records: dict[dns.name.Name, list[dns.rdata.Rdata]],
        servfail: set[tuple[dns.name.Name, int | None]],
        drop: set[tuple[dns.name.Name, int | None]],
    ) -> None:
        name = qname
        for _ in range(8):  # CNAME chain, loops cut short
            entries = records.get(name)
            if entries is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                self._soa(response, name)
                return
            matching = [r for r in entries if r.rdtype == rdtype]
            if matching:
                self._add(response.answer, name, matching)
                return
            cnames = [r for r in entries if r.rdtype == dns.rdatatype.CNAME]
            if not cnames:
                self._soa(response, name)  # NODATA
                return
            self._add(response.answer, name, cnames[:1])
            name = cnames[0].target.canonicalize()  # type: ignore[attr-defined]
            if _hit(servfail, name, rdtype) or _hit(drop, name, rdtype):
                return  # the resolver asks for the target itself and meets the fault there
        return

    def _add(self, section: list[dns.rrset.RRset], name: dns.name.Name, rdatas: Iterable[dns.rdata.Rdata]) -> None:
        rdatas = list(rdatas)
        rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rdatas[0].rdtype)
        for rd in rdatas:
            rrset.add(rd, self.ttl)
        section.append(rrset)

    def _soa(self, response: dns.message.Message, name: dns.name.Name) -> None:
        zone = name.parent() if len(name) > 2 else name  # "a.test." -> "test."
        soa = dns.rdata.from_text(
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {self.negative_ttl}",
            origin=dns.name.root,
            relativize=False,
        )
        rrset = dns.rrset.RRset(zone, dns.rdataclass.IN, dns.rdatatype.SOA)
        rrset.add(soa, self.negative_ttl)
        response.authority.append(rrset)


def _faults(entries: Iterable[str]) -> set[tuple[dns.name.Name, int | None]]:
    """``"name"`` (every type) or ``"name/TYPE"`` (that type only) -> (name, type or None)."""
    out: set[tuple[dns.name.Name, int | None]] = set()
    for entry in list(entries):
        name, _, rdtype = entry.partition("/")
        out.add((_key(name), int(dns.rdatatype.from_text(rdtype)) if rdtype else None))
    return out


def _hit(faults: set[tuple[dns.name.Name, int | None]], name: dns.name.Name, rdtype: int) -> bool:
    return (name, None) in faults or (name, int(rdtype)) in faults


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[socketserver.BaseRequestHandler], zone: ZoneServer):
        self.zone = zone
        super().__init__(address, handler)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[socketserver.BaseRequestHandler], zone: ZoneServer):
        self.zone = zone
        super().__init__(address, handler)


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        answer = self.server.zone.respond(data, "udp")
        if answer is not None:
            sock.sendto(answer, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(10)
        try:
            while True:
                size = _recv_exact(conn, 2)
                if size is None:
                    return
                wire = _recv_exact(conn, struct.unpack("!H", size)[0])
                if wire is None:
                    return
                answer = self.server.zone.respond(wire, "tcp")
                if answer is not None:
                    conn.sendall(struct.pack("!H", len(answer)) + answer)
        except OSError:
            return


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
