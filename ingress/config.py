"""The ingress's configuration, built once from Settings: what the session needs (SessionConfig)
and what the server around it needs (deadlines, limits, group commit, TLS and AUTH files)."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from common.mx import local_addresses
from common.settings import Settings
from ingress.replies import Reply

__all__ = ["IngressConfig", "SessionConfig"]


def _no_gate() -> Reply | None:
    return None


def _no_flow() -> bool:
    return False


def _any_recipient(address: str) -> Reply | None:
    return None


def _not_suppressed(sender: str, address: str) -> Reply | None:
    return None


@dataclass(frozen=True)
class SessionConfig:
    hostname: str
    max_message_size: int
    max_recipients: int
    max_errors: int = 20
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    relay_domains: frozenset[str] = frozenset()
    tls_available: bool = False
    tls_required: bool = False
    auth_available: bool = False
    # Called at MAIL and at the end of DATA; returns a Reply (e.g. 452 4.3.1) to refuse while the
    # queue is full, or None. Injected so the session stays pure.
    mail_gate: Callable[[], Reply | None] = _no_gate
    # Called for each recipient of a relay domain: None when it is a valid one, else the reply
    # (relay_recipients: 550 5.1.1). Injected like mail_gate.
    recipient_check: Callable[[str], Reply | None] = _any_recipient
    # Called at MAIL once the sender is accepted: True while delivery lags behind the ingress, and
    # the 250 waits (an AwaitFlow event) for it to catch up or for in_flow_delay. Injected like
    # mail_gate: the server's FlowGate answers from a sample it keeps, never a Redis call.
    mail_flow: Callable[[], bool] = _no_flow
    # Ask the next hop about relay-domain recipients of untrusted clients (VerifyRecipient events).
    verify_recipients: bool = False
    # Called for every recipient (sender, address): the 550 5.1.1 of an address on the suppression
    # list, or None. Injected like mail_gate: answered from a copy in memory (ingress/suppression.py).
    suppressed: Callable[[str, str], Reply | None] = _not_suppressed

    @classmethod
    def from_settings(cls, s: Settings, **kw: object) -> SessionConfig:
        base = cls(
            hostname=s.hostname,
            max_message_size=s.max_message_size,
            max_recipients=s.max_recipients,
            max_errors=s.max_errors,
            networks=tuple(s.networks),
            relay_domains=s.relay_domain_set,
            tls_available=bool(s.tls_cert),
            tls_required=s.tls_required,
            auth_available=bool(s.auth_file),
        )
        return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class IngressConfig:
    session: SessionConfig
    idle_timeout: float = 300.0
    max_connections: int = 1000
    max_per_client: int = 50
    commit_max_messages: int = 256
    commit_wait: float = 0.0
    max_queue: int = 0
    shutdown_grace: float = 30.0
    tls_cert: str = ""  # STARTTLS is offered exactly when this is set (session.tls_available)
    tls_key: str = ""
    auth_file: str = ""  # AUTH is offered exactly when this is set (session.auth_available)
    # inbound relay without backscatter
    relay_recipients: str = ""
    verify_relay_recipients: bool = False
    verify_positive_ttl: float = 604800.0
    verify_negative_ttl: float = 10800.0
    verify_timeout: float = 10.0
    relayhost: str = ""  # where the workers deliver, so where a verification asks
    smtp_port: int = 25
    dns_servers: tuple[tuple[str, int], ...] = ()
    max_mx_addresses: int = 5  # addresses a verification tries, as a delivery does
    local_ips: tuple[str, ...] = ()  # the addresses we listen on: an MX on one of them is a loop
    # mail input flow control (ingress/flow.py); 0 = off, the default for configs built by hand
    in_flow_delay: float = 0.0
    in_flow_backlog: int = 640
    # DKIM signing of trusted clients' mail (ingress/signing.py); "" = none
    dkim_keys: str = ""

    @classmethod
    def from_settings(cls, s: Settings) -> IngressConfig:
        return cls(
            session=SessionConfig.from_settings(s, verify_recipients=s.verify_relay_recipients),
            idle_timeout=s.idle_timeout,
            max_connections=s.max_connections,
            max_per_client=s.max_connections_per_client,
            commit_max_messages=s.commit_max_messages,
            commit_wait=s.commit_wait,
            max_queue=s.max_queue,
            shutdown_grace=s.shutdown_grace,
            tls_cert=s.tls_cert,
            tls_key=s.tls_key,
            auth_file=s.auth_file,
            relay_recipients=s.relay_recipients,
            verify_relay_recipients=s.verify_relay_recipients,
            verify_positive_ttl=s.verify_positive_ttl,
            verify_negative_ttl=s.verify_negative_ttl,
            verify_timeout=s.verify_timeout,
            relayhost=s.relayhost,
            smtp_port=s.smtp_port,
            dns_servers=tuple(s.dns_server_list),
            max_mx_addresses=s.max_mx_addresses,
            local_ips=tuple(local_addresses(s.listen)) if s.verify_relay_recipients else (),
            in_flow_delay=s.in_flow_delay,
            in_flow_backlog=s.in_flow_backlog,
            dkim_keys=s.dkim_keys,
        )
