"""The ingress's configuration, built once from Settings: what the session needs (SessionConfig)
and what the server around it needs (deadlines, limits, group commit, TLS and AUTH files)."""

from __future__ import annotations

from dataclasses import dataclass

from common.settings import Settings
from ingress.session import SessionConfig

__all__ = ["IngressConfig"]


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

    @classmethod
    def from_settings(cls, s: Settings) -> IngressConfig:
        return cls(
            session=SessionConfig.from_settings(s),
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
        )
