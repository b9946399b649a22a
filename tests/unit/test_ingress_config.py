"""The ingress's configuration is built once from Settings, with one answer to "is TLS on"."""

from __future__ import annotations

from common.settings import Settings
from ingress.config import IngressConfig


def test_built_once_from_settings() -> None:
    s = Settings(
        hostname="mx.test",
        idle_timeout=7.0,
        max_connections=9,
        max_connections_per_client=3,
        max_queue=11,
        commit_wait=0.5,
        tls_cert="/etc/cert.pem",
        tls_key="/etc/key.pem",
        auth_file="",
        relay_domains="Ours.Test.",
    )
    c = IngressConfig.from_settings(s)
    assert (c.idle_timeout, c.max_connections, c.max_per_client, c.max_queue, c.commit_wait) == (7.0, 9, 3, 11, 0.5)
    assert c.session.hostname == "mx.test" and c.session.relay_domains == frozenset({"ours.test"})
    # STARTTLS and AUTH are offered exactly when their files are configured: one derivation
    assert c.session.tls_available and c.tls_cert == "/etc/cert.pem"
    assert not c.session.auth_available and c.auth_file == ""
    plain = IngressConfig.from_settings(Settings(hostname="mx.test"))
    assert not plain.session.tls_available and plain.tls_cert == ""
