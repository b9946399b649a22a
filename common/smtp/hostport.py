"""``[host]:port``: the one parser of the addresses an operator writes, listening addresses, DNS
servers, the relayhost and a delivery's next hop alike, Postfix style.

``host`` and ``host:port`` name a host; ``[host]`` and ``[host]:port`` are *literal* (as a next
hop: no MX lookup, the host's own addresses or the IP literal itself); an RFC 5321 address literal
``[IPv6:...]`` is accepted too. A bare IPv6 address (more than one colon) is a host without a port.
Anything else, a bad port included, is a ValueError naming what was given.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HostPort", "format_hostport", "literal_hop", "parse_destination", "parse_hostport", "split_hostport"]


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int
    literal: bool  # written in brackets: as a next hop, no MX lookup


def split_hostport(value: str, default_port: int) -> HostPort:
    """``value`` taken apart; ``default_port`` where it gives none. Raises ValueError."""
    text = value.strip()
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or not host:
            raise ValueError(f"bad address {value!r}")
        if host[:5].lower() == "ipv6:":
            host = host[5:]
        port = default_port
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad address {value!r}")
            port = _port(rest[1:], value)
        return HostPort(host, port, True)
    if text.count(":") == 1:
        host, _, port_text = text.partition(":")
        return HostPort(host, _port(port_text, value), False)
    return HostPort(text, default_port, False)


def parse_hostport(value: str, default_port: int) -> tuple[str, int]:
    """``(host, port)`` of an address to listen on or to connect to (port 0: any, to listen)."""
    hp = split_hostport(value, default_port)
    return hp.host, hp.port


def parse_destination(destination: str, port: int) -> tuple[str, int, bool]:
    """``(host, port, literal)`` of a next hop: ``example.com`` -> MX lookup; ``example.com:587``
    -> MX lookup, port 587; ``[host]``, ``[host]:port`` -> no MX lookup (``literal``). A next hop
    has a real port: 0 is a ValueError like any other bad one."""
    hp = split_hostport(destination, port)
    if hp.port == 0:
        raise ValueError(f"bad port in destination {destination!r}")
    return hp.host, hp.port, hp.literal


def literal_hop(value: str) -> str:
    """The relayhost as a literal next hop (``[host]`` or ``[host]:port``: taken as written, no MX
    lookup, as Postfix does for a bracketed relayhost), in the one spelling jobs are grouped by."""
    if value.strip().startswith("["):
        return value
    hp = split_hostport(value, 0)
    return f"[{hp.host}]:{hp.port}" if hp.port else f"[{hp.host}]"


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(text: str, value: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"bad port in {value!r}")
    return int(text)
