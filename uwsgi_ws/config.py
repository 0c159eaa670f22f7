"""Configuration of the websocket instance, which never reads Django settings.

Only what the instance itself needs lives here: the shared ticket secret, where
Redis is, and how many connections it may open. Per-connection policy (limits,
history, heartbeat) is decided by Django and travels in the ticket.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .exceptions import ConfigurationError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Config:
    """Settings of a websocket instance.

    Attributes:
        secret: shared secret used to verify tickets; the same value as Django's
            ``DJANGO_WS["TICKET_SECRET"]``.
        redis_url: Redis URL (``redis://``, ``rediss://``, ``unix://``, or
            ``redis+sentinel://host:port,host:port/service/db``).
        clock_skew: seconds of clock difference tolerated when checking expiry.
        pool_size: connections a worker may use for publishing and history reads,
            besides its single subscriber connection.
        subscribe_timeout: seconds to wait for Redis to confirm a subscription.
        publish_command: ``PUBLISH`` or ``SPUBLISH`` (Redis Cluster).
    """

    secret: bytes
    redis_url: str = DEFAULT_REDIS_URL
    clock_skew: float = 5.0
    pool_size: int = 10
    subscribe_timeout: float = 10.0
    publish_command: str = "PUBLISH"

    def __post_init__(self) -> None:
        from .redis_url import check_publish_command, check_url

        check_url(self.redis_url)
        check_publish_command(self.publish_command, self.redis_url)
        if not self.secret:
            raise ConfigurationError("the ticket secret is empty")
        if self.pool_size < 1:
            raise ConfigurationError(f"pool_size must be at least 1, not {self.pool_size}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build the configuration from ``DJANGO_WS_*`` environment variables.

        Raises:
            ConfigurationError: ``DJANGO_WS_SECRET`` is missing or a number is bad.
        """
        env = os.environ if environ is None else environ
        secret = env.get("DJANGO_WS_SECRET", "")
        if not secret:
            raise ConfigurationError(
                "DJANGO_WS_SECRET is not set: give the websocket instance the same "
                "secret as Django's DJANGO_WS['TICKET_SECRET'] (e.g. env = "
                "DJANGO_WS_SECRET=... in the uWSGI ini file)"
            )
        return cls(
            secret=secret.encode("utf-8"),
            redis_url=env.get("DJANGO_WS_REDIS_URL", DEFAULT_REDIS_URL),
            clock_skew=_number(env, "DJANGO_WS_CLOCK_SKEW", 5.0),
            pool_size=int(_number(env, "DJANGO_WS_POOL_SIZE", 10)),
            subscribe_timeout=_number(env, "DJANGO_WS_SUBSCRIBE_TIMEOUT", 10.0),
            publish_command=env.get("DJANGO_WS_PUBLISH_COMMAND", "PUBLISH"),
        )


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, not {raw!r}") from None
    if value < 0:
        raise ConfigurationError(f"{name} must not be negative, not {raw!r}")
    return value
