"""Replication as the operator sees it (pure parsing, the failover count in Redis) and how every
role reaches Redis through the Sentinels."""

from __future__ import annotations

from pathlib import Path

import fakeredis
import pytest
from redis.sentinel import SentinelConnectionPool

from common.redisconn import NoRedis, connect, read_secret
from common.replication import ReplicationView, note_primary, parse_replication
from common.settings import Settings

INFO = {
    "role": "master",
    "connected_slaves": 2,
    "master_repl_offset": 1000,
    "slave0": {"ip": "10.0.0.2", "port": 6379, "state": "online", "offset": 990, "lag": 0},
    "slave1": {"ip": "10.0.0.3", "port": 6380, "state": "wait_bgsave", "offset": 0, "lag": 7},
}


def test_replicas_with_their_lag_from_info() -> None:
    role, replicas = parse_replication(INFO)
    assert role == "master"
    assert [(r.address, r.state, r.lag_bytes, r.lag_seconds) for r in replicas] == [
        ("10.0.0.2:6379", "online", 10, 0),
        ("10.0.0.3:6380", "wait_bgsave", 1000, 7),
    ]
    view = ReplicationView(role, "10.0.0.1:6379", replicas, failovers=2, last_failover=0.0)
    assert view.online == 1
    lines = view.lines()
    assert lines[0] == "redis: 10.0.0.1:6379 is master with 1 replica(s) online"
    assert "10 bytes behind" in lines[1] and "failovers seen: 2, the last at 1970-01-01 00:00:00 UTC" in lines[3]


def test_a_failover_is_counted_once_when_the_primary_changes() -> None:
    r = fakeredis.FakeRedis()
    assert note_primary(r, "10.0.0.1:6379", 1.0) == 0  # the first sighting is no failover
    assert note_primary(r, "10.0.0.1:6379", 2.0) == 0
    assert note_primary(r, "10.0.0.2:6379", 3.0) == 1  # another primary: one failover ...
    assert note_primary(r, "10.0.0.2:6379", 4.0) == 1  # ... counted once by every later reader
    assert note_primary(r, "10.0.0.1:6379", 5.0) == 2


def test_secrets_come_from_files_and_a_bad_one_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("  s3cret\n")
    assert read_secret(str(f), "redis_password_file") == "s3cret"
    assert read_secret("", "redis_password_file") is None
    with pytest.raises(NoRedis) as e:
        read_secret(str(tmp_path / "missing"), "redis_password_file")
    assert "redis_password_file" in str(e.value) and "\n" not in str(e.value)


def test_with_sentinels_every_role_asks_them_for_the_primary(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    s = Settings(
        redis_sentinels="127.0.0.1:26379, [::1]:26380",
        redis_sentinel_master="mail",
        redis_password_file=str(pw),
        redis_url="redis://:in-url@ignored:6379/0",
    )
    assert s.sentinel_list == [("127.0.0.1", 26379), ("::1", 26380)]
    client = connect(s)  # no connection is made until a command is sent
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mail"
    assert pool.connection_kwargs["password"] == "from-file"
    # without a file, the URL's password (docker compose keeps it there)
    url_only = connect(Settings(redis_sentinels="127.0.0.1:26379", redis_url="redis://:in-url@redis:6379/0"))
    assert url_only.connection_pool.connection_kwargs["password"] == "in-url"


def test_bad_settings_fail_early() -> None:
    with pytest.raises(ValueError):
        Settings(redis_min_replicas=-1)
    with pytest.raises(ValueError):
        Settings(redis_replica_timeout=0)
    with pytest.raises(ValueError):
        Settings(redis_sentinels="host:notaport")
