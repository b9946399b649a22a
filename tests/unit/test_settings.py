from __future__ import annotations

import pytest

from common.settings import Settings, hostname_problem


def test_to_env_round_trips_every_field() -> None:
    s = Settings(
        hostname="mx.example.test",
        workers=3,
        tls_required=True,
        commit_wait=0.002,
        relayhost="[smart.test]:587",
        mynetworks="10.0.0.0/8,::1/128",
    )
    env = s.to_env()
    assert env["MTAQ_TLS_REQUIRED"] == "yes" and env["MTAQ_WORKERS"] == "3"
    assert Settings.from_env(env) == s
    assert Settings.from_env(Settings().to_env()) == Settings()


def test_to_env_holds_only_settings() -> None:
    assert all(k.startswith("MTAQ_") for k in Settings().to_env())


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("mx1.example.com", None),
        ("mx1.example.com.", None),
        ("mtaq.test", None),
        ("localhost", "not a fully qualified domain name"),
        ("mail", "not a fully qualified domain name"),
        ("", "not a fully qualified domain name"),
        ("192.0.2.1", "an address, not a name"),
        ("host.localdomain", "private name"),
        ("under_score.example.com", "not a valid DNS name"),
    ],
)
def test_hostname_problem(name: str, problem: str | None) -> None:
    found = hostname_problem(name)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and "MTAQ_HOSTNAME" in found
