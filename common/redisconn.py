"""How every role finds Redis: an explicit URL, or the embedded server of `mtaq run` in data_dir."""

from __future__ import annotations

import os

import redis

from common.settings import Settings

__all__ = ["NoRedis", "connect", "embedded_socket", "redis_url"]


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


def connect(settings: Settings, *, timeout: float = 10.0) -> redis.Redis:
    """A client with bounded timeouts: a Redis that hangs must turn into a 451, not a stuck session."""
    return redis.Redis.from_url(
        redis_url(settings), socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30
    )
