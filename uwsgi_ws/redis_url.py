"""Redis connections from one URL: a single server, a Sentinel-managed primary, or a Cluster.

``redis://``, ``rediss://`` and ``unix://`` URLs name one server. A Sentinel setup is
named with every Sentinel and the service, a Cluster with some of its nodes::

    redis+sentinel://[:password@]host1:26379,host2:26379/<service>[/<db>]
    redis+cluster://[:password@]host1:7000,host2:7000

so the same string configures Django (``DJANGO_WS["REDIS_URL"]``) and the websocket
instance (``DJANGO_WS_REDIS_URL``). After a failover, new connections go to the new
primary: the Hub reconnects and re-subscribes, publishers retry on their next call.

In a Cluster every key of a channel shares its hash tag, so each publish and history
read is one script on one node. Messages go out with ``PUBLISH``, which a Cluster
forwards to every node: the Hub's one subscriber connection may sit on any node (it
moves to the next node given in the URL when its node fails). Or with ``SPUBLISH``,
which only the shard owning the channel's slot carries: the worker then holds one
subscriber connection per master it needs (see :mod:`uwsgi_ws.shards`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.connection import Connection

from .exceptions import ConfigurationError

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME, CLUSTER_SCHEME)


@dataclass(frozen=True)
class SentinelTarget:
    """The parts of a ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    password: str | None = None


@dataclass(frozen=True)
class ClusterTarget:
    """The parts of a ``redis+cluster://`` URL."""

    nodes: tuple[tuple[str, int], ...]
    password: str | None = None


def _hosts(url: str, netloc: str, example: str) -> tuple[tuple[tuple[str, int], ...], str | None]:
    password = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[-1]) or None
    hosts = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigurationError(f"bad address {item!r} in {url!r}: use {example}")
        hosts.append((host.strip("[]"), int(port)))
    return tuple(hosts), password


def parse_cluster_url(url: str) -> ClusterTarget:
    """Split a ``redis+cluster://`` URL.

    Raises:
        ConfigurationError: no node, a bad address, or a database other than 0.
    """
    parts = urlsplit(url)
    nodes, password = _hosts(url, parts.netloc, "redis+cluster://host:port,host:port")
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigurationError(f"a Redis Cluster has only database 0: {url!r}")
    return ClusterTarget(nodes, password)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Split a ``redis+sentinel://`` URL.

    Raises:
        ConfigurationError: the URL does not name at least one Sentinel and a service.
    """
    parts = urlsplit(url)
    sentinels, password = _hosts(url, parts.netloc, "redis+sentinel://host:port,host:port/service/db")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigurationError(f"name the Sentinel service (and optionally the db) in {url!r}: .../mymaster/0")
    return SentinelTarget(sentinels, path[0], int(path[1]) if len(path) == 2 else 0, password)


def check_url(url: str) -> str:
    """Return ``url`` if it is a Redis URL this package understands, else raise ConfigurationError."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"a Redis URL starts with redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://: {url!r}"
        )
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url)
    if scheme == CLUSTER_SCHEME:
        parse_cluster_url(url)
    return url


def is_cluster(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME + "://")


def check_publish_command(command: str, url: str) -> str:
    """Return ``command`` if it can publish to the Redis at ``url``, else raise ConfigurationError."""
    if command not in ("PUBLISH", "SPUBLISH"):
        raise ConfigurationError(f"the publish command must be PUBLISH or SPUBLISH, not {command!r}")
    return command


def _sentinel(target: SentinelTarget, socket_timeout: float | None) -> Any:
    from redis.sentinel import Sentinel

    return Sentinel(
        list(target.sentinels),
        sentinel_kwargs={"socket_timeout": 2.0, "socket_connect_timeout": 2.0},
        socket_timeout=socket_timeout,
    )


def _waiting(pool_class: type, wait: float) -> type:
    """``pool_class`` with ``wait`` as the longest wait for a free connection."""

    class WaitingPool(pool_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, timeout: float = wait, **kwargs: Any) -> None:
            super().__init__(*args, timeout=timeout, **kwargs)

    WaitingPool.__name__ = WaitingPool.__qualname__ = "Waiting" + pool_class.__name__
    return WaitingPool


def _blocking_sentinel_pool() -> type:
    from redis.sentinel import SentinelConnectionPool

    # The Sentinel pool finds the primary (and drops connections to a former one);
    # the blocking pool makes callers wait for a free connection instead of failing.
    class BlockingSentinelConnectionPool(SentinelConnectionPool, redis.BlockingConnectionPool):
        def disconnect(self, inuse_connections: bool = True) -> None:
            # The Sentinel pool passes the argument of ConnectionPool.disconnect; the
            # blocking pool closes every connection and takes none.
            redis.BlockingConnectionPool.disconnect(self)

    return BlockingSentinelConnectionPool


def make_client(url: str, *, max_connections: int | None = None, wait: float = 10.0, **options: Any) -> redis.Redis:
    """Return a client for ``url``.

    ``max_connections`` bounds its pool (per node on a Cluster): callers then wait up
    to ``wait`` seconds for a free connection, whatever the kind of URL, rather than
    fail with "Too many connections" when many connections need Redis at once (as
    they all do right after a failover).
    """
    if is_cluster(url):
        from redis.cluster import ClusterNode, RedisCluster

        cluster = parse_cluster_url(url)
        if max_connections is not None:
            options["max_connections"] = max_connections  # per node
            # Per-node pools of that class are made only for clusters given by URL.
            host, port = cluster.nodes[0]
            options["url"] = f"redis://{_netloc(host, port)}/0"
            options["connection_pool_class"] = _waiting(redis.BlockingConnectionPool, wait)
            startup = [ClusterNode(host, port) for host, port in cluster.nodes[1:]]
        else:
            startup = [ClusterNode(host, port) for host, port in cluster.nodes]
        return RedisCluster(  # type: ignore[return-value]
            startup_nodes=startup,
            password=cluster.password,
            **options,
        )
    if url.startswith(SENTINEL_SCHEME + "://"):
        target = parse_sentinel_url(url)
        if max_connections is not None:
            options["max_connections"] = max_connections
            options["connection_pool_class"] = _waiting(_blocking_sentinel_pool(), wait)
        return _sentinel(target, options.get("socket_timeout")).master_for(
            target.service, db=target.db, password=target.password, **options
        )
    if max_connections is not None:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=wait, **options)
        return redis.Redis(connection_pool=pool)
    return redis.Redis.from_url(url, **options)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def node_factory(url: str, **options: Any) -> Callable[[str, int], Connection]:
    """Return a function that makes a new, unconnected connection to one node of
    the Cluster at ``url`` (with the URL's password)."""
    cluster = parse_cluster_url(url)

    def connect(host: str, port: int) -> Connection:
        return Connection(host=host, port=port, password=cluster.password, **options)

    return connect


def subscriber_factory(url: str, **options: Any) -> Callable[[], Connection]:
    """Return a function that makes a new, unconnected connection for a subscriber.

    With Sentinel, each new connection asks the Sentinels for the current primary;
    with a Cluster, each new connection goes to the next node of the URL.
    """
    if is_cluster(url):
        cluster = parse_cluster_url(url)
        turns = itertools.cycle(cluster.nodes)

        def next_node() -> Connection:
            host, port = next(turns)
            return Connection(host=host, port=port, password=cluster.password, **options)

        return next_node
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
