"""One typed Settings object for every role.

Each field is an environment variable ``MTAQ_<NAME>`` and a command-line flag ``--<name>``
(underscores become dashes); a flag beats the environment, which beats the default. Defaults follow
Postfix where Postfix has an equivalent parameter (named in the field's help).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from common.smtp.hostport import parse_destination, parse_hostport

__all__ = ["Settings", "add_arguments", "hostname_problem"]


def _opt(default: Any, help: str, roles: tuple[str, ...] = ("all",)) -> Any:
    return field(default=default, metadata={"help": help, "roles": roles})


@dataclass(frozen=True)
class Settings:
    # -- where things are
    listen: str = _opt("127.0.0.1:2525", "ingress address host:port", ("ingress",))
    hostname: str = _opt(
        "",
        "our host name in the greeting, EHLO and Received: (default: the FQDN, often just localhost); set it to "
        "this host's public DNS name: remote servers check it, and mtaq warns at start-up when it is not one",
    )
    redis_url: str = _opt("", "Redis URL; unset with `mtaq run` = the embedded redis-server in data_dir")
    data_dir: str = _opt("./var", "where the embedded Redis keeps its AOF and socket")
    workers: int = _opt(2, "worker processes started by `mtaq run`", ("run",))
    journal_dir: str = _opt(
        "",
        "where each worker process appends the outcomes it has read and not yet recorded in Redis; "
        "another worker on this host records those of one that died, before its job runs again "
        "(unset = data_dir/journal; a local disk: the files are lockf-locked; off = no journal: what a "
        "killed worker had delivered and not recorded is sent again)",
        ("worker",),
    )
    processes: int = _opt(0, "ingress processes sharing the port (0 = CPU count; `run` uses 1)", ("ingress",))
    queue_name: str = _opt("mtaq", "the RQ queue the workers take jobs from")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _opt("text", "text (Postfix-like lines) or json (one object per line, for log shippers)")
    metrics_listen: str = _opt(
        "", "host:port of Prometheus /metrics and the status page at / (unset = none)", ("run", "ingress", "exporter")
    )
    redis_appendfsync: str = _opt(
        "always",
        "embedded Redis: always (250 means on disk) or everysec (faster; a power cut may lose up to 2 s "
        "of accepted mail)",
        ("run",),
    )
    # -- delivery (worker)
    dns_servers: str = _opt("", "comma list of ip[:port] resolvers; unset = the system resolver", ("worker", "ingress"))
    smtp_port: int = _opt(25, "remote port for MX delivery (and recipient verification)", ("worker", "ingress"))
    relayhost: str = _opt(
        "",
        "smarthost host[:port] for all mail, no MX lookup (Postfix relayhost); ingress and "
        "workers group mail by it, so give both the same",
        ("ingress", "worker"),
    )
    min_backoff: float = _opt(
        300.0,
        "seconds; a deferred recipient is retried after its time in the queue, clamped to min_backoff..max_backoff "
        "(Postfix minimal_backoff_time)",
        ("worker",),
    )
    max_backoff: float = _opt(4000.0, "seconds, Postfix maximal_backoff_time", ("worker",))
    queue_lifetime: float = _opt(432000.0, "seconds before a deferred recipient bounces (5 days)", ("worker",))
    bounce_lifetime: float = _opt(
        0.0,
        "seconds before an undeliverable bounce (from <>) is dropped; 0 = queue_lifetime "
        "(Postfix bounce_queue_lifetime)",
        ("worker",),
    )
    delay_warning: float = _opt(
        0.0,
        "seconds in the queue (e.g. 14400 = 4 h) before the sender gets one `Action: delayed` report; 0 = none "
        "(Postfix delay_warning_time)",
        ("worker",),
    )
    connect_timeout: float = _opt(30.0, "seconds to wait for a TCP connect (Postfix smtp_connect_timeout)", ("worker",))
    smtp_timeout: float = _opt(300.0, "seconds to wait for any remote reply", ("worker",))
    max_mx_addresses: int = _opt(
        5, "addresses tried per delivery or verification (Postfix smtp_mx_address_limit)", ("worker", "ingress")
    )
    job_timeout: int = _opt(1800, "seconds before RQ kills a delivery job", ("worker",))
    worker_concurrency: int = _opt(
        100,
        "SMTP conversations (and jobs) one worker process holds at once (Postfix default_process_limit)",
        ("worker",),
    )
    destination_concurrency: int = _opt(
        20,
        "connections to one destination at once, all workers on all hosts together, slow start from 5 "
        "(Postfix default_destination_concurrency_limit)",
        ("worker",),
    )
    destination_rate: float = _opt(
        0.0, "messages per second to one destination, all workers (0 = no limit)", ("worker",)
    )
    destination_messages_per_connection: int = _opt(
        100, "messages over one connection before a new one (Postfix smtp_connection_reuse_count_limit)", ("worker",)
    )
    destination_failure_limit: int = _opt(
        5, "connection failures in a row before a destination is suspended for destination_retry_time", ("worker",)
    )
    destination_retry_time: float = _opt(
        60.0, "seconds a destination stays suspended after destination_failure_limit failures", ("worker",)
    )
    maintenance_interval: int = _opt(
        600,
        "seconds between queue sweeps (lost jobs, left-behind messages); RQ's registry clean-up, which re-runs "
        "a dead worker's jobs, runs every 10 s regardless",
        ("worker",),
    )
    # -- ingress policy and limits
    mynetworks: str = _opt("127.0.0.0/8,::1/128", "comma list of networks allowed to relay", ("ingress",))
    relay_domains: str = _opt("", "comma list of domains anyone may send to (inbound relay)", ("ingress",))
    max_message_size: int = _opt(
        10240000,
        "octets, advertised in SIZE and enforced while reading DATA (Postfix message_size_limit)",
        ("ingress",),
    )
    max_recipients: int = _opt(
        1000, "recipients per message; beyond: 452 4.5.3 (Postfix smtpd_recipient_limit)", ("ingress",)
    )
    max_errors: int = _opt(20, "errors before 421 and close (Postfix smtpd_hard_error_limit)", ("ingress",))
    idle_timeout: float = _opt(
        300.0, "seconds a client has to complete a command; then 421 4.4.2 (Postfix smtpd_timeout)", ("ingress",)
    )
    max_connections: int = _opt(
        1000, "concurrent connections per ingress process; beyond: 421 4.7.0 at the greeting", ("ingress",)
    )
    max_connections_per_client: int = _opt(
        50,
        "concurrent connections per client address; beyond: 421 4.7.0 at the greeting "
        "(Postfix smtpd_client_connection_count_limit)",
        ("ingress",),
    )
    max_queue: int = _opt(0, "messages in the queue before new mail gets 452 4.3.1 (0 = no limit)", ("ingress",))
    tls_cert: str = _opt("", "PEM certificate chain for STARTTLS; unset = no STARTTLS", ("ingress",))
    tls_key: str = _opt("", "PEM private key for tls_cert", ("ingress",))
    tls_required: bool = _opt(False, "refuse MAIL before STARTTLS (submission)", ("ingress",))
    auth_file: str = _opt(
        "",
        "credentials file written by `mtaq passwd` for AUTH PLAIN/LOGIN (offered only under TLS); unset = no AUTH",
        ("ingress",),
    )
    commit_max_messages: int = _opt(256, "messages written per group commit", ("ingress",))
    commit_wait: float = _opt(
        0.025,
        "seconds a group commit waits, under load, for the sessions with a transaction open (ends "
        "once all wait; idle: none)",
        ("ingress",),
    )
    in_flow_delay: float = _opt(
        1.0,
        "seconds at most a MAIL waits for its 250 while delivery lags behind the ingress, then goes on: "
        "clients are slowed, never refused (Postfix in_flow_delay; 0 = off)",
        ("ingress",),
    )
    in_flow_backlog: int = _opt(
        640,
        "delivery lags (in_flow_delay applies) while about this many messages are in unfinished delivery "
        "jobs (waiting for a worker or held by one: jobs times the messages per job the ingress writes); "
        "retries waiting for their time and jobs of a destination that is down do not count",
        ("ingress",),
    )
    job_max_messages: int = _opt(100, "messages per delivery job", ("ingress", "worker"))
    job_max_bytes: int = _opt(
        20_000_000, "octets of messages per delivery job (one larger message still goes)", ("ingress", "worker")
    )
    shutdown_grace: float = _opt(30.0, "seconds SIGTERM waits for transactions in flight", ("ingress",))
    # -- inbound relay without backscatter (ingress)
    relay_recipients: str = _opt(
        "",
        "file of the valid recipients of relay_domains, an address or @domain a line; others get 550 "
        "5.1.1 (Postfix relay_recipient_maps); unset = all",
        ("ingress",),
    )
    verify_relay_recipients: bool = _opt(
        False,
        "ask the next hop at RCPT whether a relay_domains recipient exists (reject_unverified_recipient)",
        ("ingress",),
    )
    verify_positive_ttl: float = _opt(
        604800.0, "seconds a verified recipient is remembered (address_verify_positive_refresh_time)", ("ingress",)
    )
    verify_negative_ttl: float = _opt(
        10800.0, "seconds a refused recipient is remembered (address_verify_negative_refresh_time)", ("ingress",)
    )
    verify_timeout: float = _opt(10.0, "seconds a recipient verification may take; then 450 4.1.1", ("ingress",))
    # -- delivery events, webhook, suppression (issue 19; docs/events.md)
    events_max: int = _opt(
        1_000_000, "delivery events the Redis stream mtaq:events keeps, about (XADD MAXLEN ~; 0 = no events)"
    )
    events_webhook: str = _opt(
        "",
        "URL the delivery events are POSTed to, signed (unset = none; the stream is written anyway)",
        ("worker", "events"),
    )
    events_webhook_secret_file: str = _opt(
        "", "file holding the webhook's HMAC-SHA256 key (X-Mtaq-Signature)", ("worker", "events")
    )
    events_batch: int = _opt(
        100, "events per webhook POST at most (one POST a second at least while events wait)", ("worker", "events")
    )
    bounce_rules: str = _opt(
        "",
        "bounce classification rules (TOML, docs/events.md); unset = the shipped common/classify_rules.toml",
        ("worker",),
    )
    suppression_ttl: float = _opt(
        2_592_000.0,
        "seconds a hard-bounced (InvalidRecipient) address is refused at RCPT (30 days; 0 = never suppress)",
        ("worker",),
    )
    # -- high availability: Redis replication and Sentinel (docs/high-availability.md)
    redis_sentinels: str = _opt(
        "", "comma list of Sentinel host:port; set = find the Redis primary through them instead of redis_url"
    )
    redis_sentinel_master: str = _opt("mtaq", "the name the Sentinels monitor the primary under")
    redis_sentinel_password_file: str = _opt("", "file holding the Sentinels' password (unset = none)")
    redis_password_file: str = _opt("", "file holding the Redis password (unset = none, or the one in redis_url)")
    redis_min_replicas: int = _opt(
        0,
        "replicas that must have a group commit before the ingress answers 250 (WAIT; 0 = the primary's "
        "own disk is enough); workers wait the same way before a job counts as done",
        ("ingress", "worker"),
    )
    redis_replica_timeout: float = _opt(
        1.0, "seconds WAIT gives the replicas; then the ingress answers 451 4.3.0", ("ingress", "worker")
    )
    # -- outbound TLS (issue 21): trust anchors, MTA-STS, DANE (worker/tlspolicy.py)
    tls_ca_file: str = _opt(
        "",
        "PEM CA bundle against which MX certificates (MTA-STS, relayhost verification) and MTA-STS "
        "policy servers are verified; unset = the system's CA store",
        ("worker",),
    )
    mta_sts: bool = _opt(True, "honour MTA-STS policies of destination domains (RFC 8461)", ("worker",))
    dane: bool = _opt(
        False,
        "honour DANE TLSA records (RFC 7672); needs dns_servers to be a DNSSEC-validating resolver you trust",
        ("worker",),
    )
    # -- DKIM signing and smarthosts (issue 22; docs/signing.md)
    dkim_keys: str = _opt(
        "",
        "key table, DOMAIN SELECTOR KEYFILE a line: trusted clients' mail and our DSNs are signed by the "
        "From: domain's keys (or its nearest parent's); the ingress prepares the signatures and the worker "
        "makes them, so give both the same table; unset = no signing",
        ("ingress", "worker"),
    )
    relayhost_auth_file: str = _opt(
        "",
        "file with `username password` (or username:password) for the relayhost: sent with AUTH only "
        "after STARTTLS with a certificate valid for the relayhost's name",
        ("worker",),
    )
    transport_table: str = _opt(
        "",
        "file of DOMAIN NEXTHOP lines (.example.com = subdomains; [host]:port literal, host = its MX), "
        "consulted before relayhost and MX (Postfix transport_maps); ingress and workers both read it",
        ("ingress", "worker"),
    )

    def __post_init__(self) -> None:
        if not self.hostname:
            object.__setattr__(self, "hostname", socket.getfqdn() or "localhost")
        for net in self.networks:
            del net  # parsing in .networks raises on a bad entry, early
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be 'text' or 'json'")
        if self.redis_appendfsync not in ("always", "everysec"):
            raise ValueError("redis_appendfsync must be 'always' or 'everysec'")
        if self.min_backoff <= 0 or self.max_backoff < self.min_backoff:
            raise ValueError("need 0 < min_backoff <= max_backoff")
        if self.bounce_lifetime < 0 or self.delay_warning < 0:
            raise ValueError("bounce_lifetime and delay_warning must be 0 (off/default) or more")
        if self.in_flow_delay < 0 or self.in_flow_backlog < 1:
            raise ValueError("need in_flow_delay >= 0 (0 = off) and in_flow_backlog >= 1")
        if self.events_max < 0 or self.events_batch < 1 or self.suppression_ttl < 0:
            raise ValueError("need events_max >= 0 (0 = off), events_batch >= 1 and suppression_ttl >= 0")
        if self.events_webhook and not self.events_webhook.startswith(("http://", "https://")):
            raise ValueError("events_webhook must be an http:// or https:// URL")
        # [host]:port values: a bad one is one line here, not a traceback where it is first used
        for name, value in (("listen", self.listen), ("metrics_listen", self.metrics_listen)):
            _hostport(name, value)
        for server in self.dns_servers.split(","):
            _hostport("dns_servers", server)
        if self.relayhost.strip():
            _hostport("relayhost", self.relayhost)
        for server in self.redis_sentinels.split(","):
            _hostport("redis_sentinels", server)
        if self.redis_min_replicas < 0 or self.redis_replica_timeout <= 0:
            raise ValueError("need redis_min_replicas >= 0 and redis_replica_timeout > 0")
        if self.tls_ca_file:
            try:
                with open(self.tls_ca_file, "rb") as f:
                    pem = f.read()
            except OSError as e:
                raise ValueError(f"tls_ca_file {self.tls_ca_file!r}: {e.strerror or e}: give a PEM CA bundle") from None
            if b"-----BEGIN CERTIFICATE-----" not in pem:
                raise ValueError(f"tls_ca_file {self.tls_ca_file!r} holds no PEM certificate: give a PEM CA bundle")

    # -- parsed views
    @property
    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n.strip(), strict=False) for n in self.mynetworks.split(",") if n.strip()]

    @property
    def relay_domain_set(self) -> frozenset[str]:
        return frozenset(d.strip().lower().rstrip(".") for d in self.relay_domains.split(",") if d.strip())

    @property
    def stop_timeout(self) -> float:
        """How long a supervisor waits for its children before SIGKILL: each needs up to
        shutdown_grace for its transactions in flight, then CLOSE_GRACE and its last group commit."""
        return self.shutdown_grace + 10

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_hostport(self.listen, 2525)

    @property
    def sentinel_list(self) -> list[tuple[str, int]]:
        return [parse_hostport(s.strip(), 26379) for s in self.redis_sentinels.split(",") if s.strip()]

    @property
    def dns_server_list(self) -> list[tuple[str, int]]:
        return [parse_hostport(s.strip(), 53) for s in self.dns_servers.split(",") if s.strip()]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"MTAQ_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _convert(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_args(cls, ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
        names = {f.name for f in fields(cls)}
        return cls.from_env(env, **{k: v for k, v in vars(ns).items() if k in names})

    def to_env(self) -> dict[str, str]:
        """The ``MTAQ_*`` variables that give a child process these exact settings (from_env's inverse)."""
        return {f"MTAQ_{f.name.upper()}": _render(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# Names that are dotted yet nobody else's name for this host.
_PRIVATE_SUFFIXES = (".localdomain", ".localhost", ".local", ".internal", ".lan", ".home.arpa")


def hostname_problem(name: str) -> str | None:
    """Why ``name`` is a poor name for mtaq to give the world in its greeting, EHLO and Received:
    (remote servers check it, and some refuse mail from a bare or private name); None if fine."""
    hint = "set hostname (--hostname / MTAQ_HOSTNAME) to this host's public DNS name"
    host = name.strip().rstrip(".").lower()
    if not host or "." not in host:
        return f"hostname {name!r} is not a fully qualified domain name: {hint}"
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return f"hostname {name!r} is an address, not a name: {hint}"
    if not all(_LABEL.fullmatch(label) for label in host.split(".")):
        return f"hostname {name!r} is not a valid DNS name: {hint}"
    if host.endswith(_PRIVATE_SUFFIXES):
        return f"hostname {name!r} is a private name the world cannot look up: {hint}"
    return None


def _hostport(name: str, value: str) -> None:
    if value.strip():
        try:
            if name == "relayhost":
                parse_destination(value, 1)  # a next hop: port 0 is no port
            else:
                parse_hostport(value, 0)
        except ValueError as e:
            raise ValueError(f"{name}: {e} (expected host, host:port or [host]:port)") from None


def _render(value: Any) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind: type[Any] = type(f.default)
    if kind is bool:
        if raw.strip().lower() in ("1", "yes", "true", "on"):
            return True
        if raw.strip().lower() in ("0", "no", "false", "off", ""):
            return False
        raise ValueError(f"MTAQ_{f.name.upper()}={raw!r}: expected yes or no")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"MTAQ_{f.name.upper()}={raw!r}: expected {kind.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    """Add a ``--name`` flag for every setting the role uses. Defaults stay None so that the
    environment is not overridden by a flag that was not given."""
    for f in fields(Settings):
        roles: Sequence[str] = f.metadata["roles"]
        if "all" not in roles and role not in roles and role not in ("run", "queue"):
            continue
        # Both spellings: --redis-url reads well, --redis_url is the setting's own name.
        flags = ["--" + f.name.replace("_", "-")] + (["--" + f.name] if "_" in f.name else [])
        help_text = f"{f.metadata['help']} [env MTAQ_{f.name.upper()}, default {f.default!r}]"
        if isinstance(f.default, bool):
            parser.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(*flags, dest=f.name, type=type(f.default), default=None, help=help_text)
