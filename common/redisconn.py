"""How every role finds Redis: through the Sentinels (``redis_sentinels``), an explicit URL, or the
embedded server of `mtaq run` in data_dir.

Through the Sentinels a client follows a failover on its own: redis-py's Sentinel pool asks them for
the primary on every new connection, and a connection to a primary that has since become a replica
fails (READONLY) and is replaced, so no process needs a restart. While no primary is known, commands
raise ``redis.ConnectionError`` (MasterNotFoundError), which the ingress turns into ``451 4.3.0``.

A primary that hung and comes back after the Sentinels promoted its replica still believes it is
the primary until they turn it into a replica, seconds later; the connections a process made to it
before the failover write to it meanwhile, and what they write is lost when it resyncs (the
deployment test saw a job's outcomes and removals land there while the same job's end landed on
the new primary: its messages were left with no job, for the sweep). The servers of the ha set-up
refuse writes without a replica in sync (``min-replicas-to-write``, docs/high-availability.md),
and ``FencedConnection`` makes that refusal (NOREPLICAS) what READONLY already is: the connection
dropped, a ``redis.ConnectionError``, which every role waits out as it waits out a failover."""

from __future__ import annotations

import os
from typing import Any, NoReturn

import redis
from redis.sentinel import Sentinel, SentinelManagedConnection

from common.redispack import CommandPacker, one_write
from common.settings import Settings

__all__ = [
    "REDIS_AWAY",
    "FencedConnection",
    "NoRedis",
    "NoReplicasError",
    "connect",
    "embedded_socket",
    "read_secret",
    "redis_url",
    "sentinel",
]


class NoRedis(RuntimeError):
    pass


def embedded_socket(data_dir: str) -> str:
    return os.path.join(os.path.abspath(data_dir), "redis.sock")


def redis_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    sock = embedded_socket(settings.data_dir)
    if not os.path.exists(sock):
        raise NoRedis(
            f"no Redis: MTAQ_REDIS_URL is unset and no embedded Redis runs in {settings.data_dir!r} "
            f"({sock} is missing). Start `mtaq run --data-dir {settings.data_dir}` or set --redis-url."
        )
    return f"unix://{sock}"


def read_secret(path: str, what: str) -> str | None:
    """The content of a secret file without surrounding whitespace; None for no file. A file that
    cannot be read is one line naming the setting, never the secret."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise NoRedis(f"cannot read {what} {path!r}: {e.strerror or e}; check the path and its permissions") from None


NOREPLICAS = "NOREPLICAS"  # Redis's error when fewer replicas than min-replicas-to-write are in sync
# Redis away for now, as every role waits it out: no connection, no answer in time, a Redis still
# loading its AOF (BusyLoadingError) or taking no writes (NoReplicasError): both ConnectionErrors
REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError)


class NoReplicasError(redis.ConnectionError):
    """The primary refuses writes: fewer replicas in sync than its min-replicas-to-write."""


class FencedConnection(SentinelManagedConnection):
    """A connection to the primary the Sentinels name that treats the primary's refusal to write
    for want of replicas (NOREPLICAS) as a lost primary: dropped, and ``redis.ConnectionError``.
    Nothing was written (Redis refuses every write then, and a script at its first write), so what
    retries it loses nothing."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            response = super().read_response(*args, **kwargs)
        except redis.ResponseError as e:
            # the text: NOREPLICAS first; a script's refused write in Redis 6.2's ERR; an EXECABORT
            # when the count dropped between MULTI's commands and the EXEC
            if NOREPLICAS not in str(e):
                raise
            self._refused(e)
        if type(response) is list:
            # an EXEC's array: a script queued in MULTI is refused at its first write there, and
            # Redis refuses every write of the transaction then (nothing in it was written)
            for item in response:
                if isinstance(item, redis.ResponseError) and NOREPLICAS in str(item):
                    self._refused(item)
        return response

    def _refused(self, e: redis.ResponseError) -> NoReturn:
        self.disconnect()  # type: ignore[no-untyped-call]
        raise NoReplicasError(f"the primary takes no writes: {e}") from e


def sentinel(settings: Settings, *, timeout: float = 5.0) -> Sentinel:
    """A client of the Sentinels named by ``redis_sentinels`` (the caller checked it is set)."""
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    password = read_secret(settings.redis_sentinel_password_file, "redis_sentinel_password_file")
    if password is not None:
        sentinel_kwargs["password"] = password
    return Sentinel(settings.sentinel_list, sentinel_kwargs=sentinel_kwargs)


_PACKER = CommandPacker()


def connect(settings: Settings, *, timeout: float = 10.0, connect_timeout: float | None = None) -> redis.Redis:
    """A client with bounded timeouts: a Redis that hangs must turn into a 451, not a stuck session."""
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout if connect_timeout is None else connect_timeout,
        "health_check_interval": 30,
        "command_packer": _PACKER,  # arguments packed in C (common/redispack.py)
    }
    password = read_secret(settings.redis_password_file, "redis_password_file")
    if password is None and settings.redis_sentinels and settings.redis_url:
        # through the Sentinels the URL names no server, but its password is the one to give
        # (docker compose keeps it there for both set-ups)
        password = redis.connection.parse_url(settings.redis_url).get("password")  # type: ignore[no-untyped-call]
    if password is not None:
        kwargs["password"] = password
    if settings.redis_sentinels:
        client: redis.Redis = sentinel(settings, timeout=min(timeout, 5.0)).master_for(
            settings.redis_sentinel_master, connection_class=one_write(FencedConnection), **kwargs
        )
        return client
    url = redis_url(settings)
    # the class the URL's scheme names (a Unix socket, TLS, TCP), its pipelines' short pieces joined
    # into few writes (common/redispack.py one_write)
    base = redis.connection.parse_url(url).get("connection_class", redis.Connection)  # type: ignore[no-untyped-call]
    return redis.Redis.from_url(url, connection_class=one_write(base), **kwargs)
