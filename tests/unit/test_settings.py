from __future__ import annotations

from common.settings import Settings


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
