"""Redis connections from one URL, for a single server or a Sentinel-managed primary.

``redis://``, ``rediss://`` and ``unix://`` URLs name one server. A Sentinel setup is
named with every Sentinel and the service::

    redis+sentinel://[:password@]host1:26379,host2:26379/<service>[/<db>]

so the same string configures Django (``DJANGO_WS["REDIS_URL"]``) and the websocket
instance (``DJANGO_WS_REDIS_URL``). After a failover, new connections go to the new
primary: the Hub reconnects and re-subscribes, publishers retry on their next call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.connection import Connection

from .exceptions import ConfigurationError

SENTINEL_SCHEME = "redis+sentinel"
SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME)


@dataclass(frozen=True)
class SentinelTarget:
    """The parts of a ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Split a ``redis+sentinel://`` URL.

    Raises:
        ConfigurationError: the URL does not name at least one Sentinel and a service.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    password = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[-1]) or None
    sentinels = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigurationError(
                f"bad Sentinel address {item!r} in {url!r}: use redis+sentinel://host:port,host:port/service/db"
            )
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigurationError(f"name the Sentinel service (and optionally the db) in {url!r}: .../mymaster/0")
    return SentinelTarget(tuple(sentinels), path[0], int(path[1]) if len(path) == 2 else 0, password)


def check_url(url: str) -> str:
    """Return ``url`` if it is a Redis URL this package understands, else raise ConfigurationError."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in SCHEMES:
        raise ConfigurationError(f"a Redis URL starts with redis://, rediss://, unix:// or redis+sentinel://: {url!r}")
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url)
    return url


def _sentinel(target: SentinelTarget, socket_timeout: float | None) -> Any:
    from redis.sentinel import Sentinel

    return Sentinel(
        list(target.sentinels),
        sentinel_kwargs={"socket_timeout": 2.0, "socket_connect_timeout": 2.0},
        socket_timeout=socket_timeout,
    )


def make_client(
    url: str, *, max_connections: int | None = None, wait: float = 10.0, **options: Any
) -> redis.Redis:
    """Return a client for ``url``.

    ``max_connections`` bounds its pool: callers wait up to ``wait`` seconds for a
    free connection (with Sentinel, the bound is enforced by refusing, not waiting).
    """
    if url.startswith(SENTINEL_SCHEME + "://"):
        target = parse_sentinel_url(url)
        if max_connections is not None:
            options["max_connections"] = max_connections
        return _sentinel(target, options.get("socket_timeout")).master_for(
            target.service, db=target.db, password=target.password, **options
        )
    if max_connections is not None:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=wait, **options)
        return redis.Redis(connection_pool=pool)
    return redis.Redis.from_url(url, **options)


def subscriber_factory(url: str, **options: Any) -> Callable[[], Connection]:
    """Return a function that makes a new, unconnected connection for a subscriber.

    With Sentinel, each new connection asks the Sentinels for the current primary.
    """
    if url.startswith(SENTINEL_SCHEME + "://"):
        from redis.sentinel import SentinelConnectionPool

        target = parse_sentinel_url(url)
        sentinel_pool = SentinelConnectionPool(
            target.service,
            _sentinel(target, options.get("socket_timeout")),
            db=target.db,
            password=target.password,
            **options,
        )
        return sentinel_pool.make_connection  # type: ignore[return-value]
    pool = redis.ConnectionPool.from_url(url, **options)

    def connect() -> Connection:
        return pool.connection_class(**pool.connection_kwargs)

    return connect
