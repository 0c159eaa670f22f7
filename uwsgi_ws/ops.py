"""Operations: a worker's figures, the instance registry in Redis, metrics, drain timing.

Each websocket worker counts what it does in a :class:`Stats` of plain integers (an
increment on the delivery path costs what ``x += 1`` costs; there is no lock, no
shared memory and no label lookup there). Every ``interval`` seconds the worker
writes a snapshot of those figures, with its address, load and readiness, to the
registry in Redis (:class:`Registry`), one pipelined round trip:

* ``{<prefix>:ops}:workers`` - a sorted set of worker names (``address host pid``),
  scored by the Unix time until which the entry counts as alive (now + 3 intervals);
* ``{<prefix>:ops}:snapshots`` - a hash: worker name -> JSON snapshot.

Both keys share one hash tag, so the registry lives in one slot of a Redis Cluster.
From there:

* a Prometheus scrape of one websocket instance (on any of its workers) sums the
  snapshots of the instance's live workers (the worker that answers uses its own
  figures of this instant): one scrape per instance, whatever the number of workers;
* the front's middleware chooses a live, ready instance, the least loaded;
* ``manage.py ws_status`` shows every instance, from any Django host.

A worker that dies stops refreshing its entry, which then expires: its counters
leave the instance's sums (Prometheus' ``rate()`` reads a drop as a counter reset).

This module imports neither Django nor uWSGI; redis and prometheus_client are only
used by the functions that need them.
"""

from __future__ import annotations

import bisect
import json
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Seconds from the publish call to the socket write.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The busiest channels a worker reports (by its local subscribers).
TOP_CHANNELS = 10
# A registry entry lives this many heartbeat intervals.
TTL_INTERVALS = 3.0


class Stats:
    """What one worker did since it started: plain counters, read by snapshots."""

    __slots__ = (
        "handshakes",
        "refused",
        "delivered",
        "received",
        "published",
        "publish_errors",
        "bytes_sent",
        "closes",
        "slow_consumers",
        "recovered",
        "not_recovered",
        "lag_counts",
        "lag_sum",
    )

    def __init__(self) -> None:
        self.handshakes = 0  # accepted
        self.refused: dict[str, int] = {}  # reason -> count
        self.delivered = 0  # live messages written to clients
        self.received = 0  # client messages taken for publishing
        self.published = 0  # of those, published
        self.publish_errors = 0
        self.bytes_sent = 0
        self.closes: dict[int, int] = {}  # close code -> count
        self.slow_consumers = 0
        self.recovered = 0
        self.not_recovered = 0
        self.lag_counts = [0] * (len(LAG_BUCKETS) + 1)  # the last one: above every bucket
        self.lag_sum = 0.0

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def close(self, code: int | None) -> None:
        key = 1005 if code is None else code
        self.closes[key] = self.closes.get(key, 0) + 1

    def observe_lag(self, seconds: float, count: int = 1) -> None:
        """Record ``count`` deliveries that took ``seconds`` from the publish call."""
        if seconds < 0:
            seconds = 0.0  # clocks of two hosts disagree
        self.lag_counts[bisect.bisect_left(LAG_BUCKETS, seconds)] += count
        self.lag_sum += seconds * count

    def as_dict(self) -> dict[str, Any]:
        return {
            "handshakes": self.handshakes,
            "refused": dict(self.refused),
            "delivered": self.delivered,
            "received": self.received,
            "published": self.published,
            "publish_errors": self.publish_errors,
            "bytes_sent": self.bytes_sent,
            "closes": {str(k): v for k, v in self.closes.items()},
            "slow_consumers": self.slow_consumers,
            "recovered": self.recovered,
            "not_recovered": self.not_recovered,
            "lag_counts": list(self.lag_counts),
            "lag_sum": self.lag_sum,
        }


# --------------------------------------------------------------------------- registry


def registry_keys(prefix: str) -> tuple[str, str]:
    """The registry's sorted set of workers and hash of snapshots for ``prefix``."""
    tag = "{" + prefix + ":ops}"
    return tag + ":workers", tag + ":snapshots"


def drain_key(prefix: str, address: str) -> str:
    """The key holding a drain order for the instance at ``address``."""
    return "{" + prefix + ":ops}:drain:" + address


@dataclass
class Instance:
    """One websocket instance as the registry shows it: its live workers summed."""

    address: str
    workers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def connections(self) -> int:
        return sum(sum(w.get("connections", {}).values()) for w in self.workers)

    @property
    def ready(self) -> bool:
        """Some worker takes connections (Redis reachable, Hub subscribed, not draining)."""
        return any(w.get("ready") for w in self.workers)

    @property
    def draining(self) -> bool:
        return any(w.get("draining") for w in self.workers)

    @property
    def started(self) -> float:
        return min((w.get("started", 0.0) for w in self.workers), default=0.0)

    @property
    def channels(self) -> int:
        return sum(w.get("channels", 0) for w in self.workers)

    @property
    def subscriptions(self) -> int:
        return sum(w.get("subscriptions", 0) for w in self.workers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "ready": self.ready,
            "draining": self.draining,
            "workers": len(self.workers),
            "connections": self.connections,
            "channels": self.channels,
            "subscriptions": self.subscriptions,
            "started": self.started,
            "ops": next((w.get("ops") for w in self.workers if w.get("ops")), None),
            "heartbeat_age": min((w.get("age", 0.0) for w in self.workers), default=0.0),
        }


class Registry:
    """Read and write the instance registry of one Redis prefix.

    Args:
        client: a redis-py client.
        prefix: the Redis prefix shared by Django and the websocket instances.
    """

    def __init__(self, client: Any, prefix: str = "ws") -> None:
        self.client = client
        self.prefix = prefix
        self.workers_key, self.snapshots_key = registry_keys(prefix)

    def beat(self, name: str, snapshot: Mapping[str, Any], *, ttl: float, drain_of: str | None = None) -> float | None:
        """Write one worker's snapshot, alive for ``ttl`` seconds; one round trip.

        Also removes the entries that expired, and reads the drain order of
        ``drain_of`` (an address), returned as its Unix time (None: no order).

        Raises:
            redis.RedisError: Redis could not be reached.
        """
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.workers_key, {name: now + ttl})
        pipe.hset(self.snapshots_key, name, json.dumps(snapshot, separators=(",", ":")))
        pipe.zrangebyscore(self.workers_key, "-inf", now)
        if drain_of is not None:
            pipe.get(drain_key(self.prefix, drain_of))
        results = pipe.execute()
        expired = results[2]
        if expired:
            cleanup = self.client.pipeline(transaction=False)
            cleanup.zremrangebyscore(self.workers_key, "-inf", now)
            cleanup.hdel(self.snapshots_key, *expired)
            cleanup.execute()
        if drain_of is not None and results[3] is not None:
            try:
                return float(results[3])
            except ValueError:
                return None
        return None

    def leave(self, name: str) -> None:
        """Remove one worker's entry (it stops)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self.workers_key, name)
        pipe.hdel(self.snapshots_key, name)
        pipe.execute()

    def workers(self) -> list[dict[str, Any]]:
        """The snapshots of every live worker, each with its ``name`` and ``age`` (seconds
        since its last heartbeat, as far as this host's clock tells)."""
        now = time.time()
        names = self.client.zrangebyscore(self.workers_key, now, "+inf", withscores=True)
        if not names:
            return []
        raws = self.client.hmget(self.snapshots_key, [n for n, _ in names])
        found = []
        for (name, _score), raw in zip(names, raws, strict=True):
            if raw is None:
                continue
            try:
                snapshot = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(snapshot, dict):
                continue
            snapshot["name"] = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
            snapshot["age"] = max(0.0, now - float(snapshot.get("at", now)))
            found.append(snapshot)
        return found

    def instances(self) -> list[Instance]:
        """The live instances, by address, sorted by address."""
        return group_instances(self.workers())

    def order_drain(self, address: str, *, at: float | None = None, ttl: float = 86400.0) -> None:
        """Ask the instance at ``address`` to drain: its workers started before the
        order stop taking connections and close theirs (see docs/guide/operations.md)."""
        self.client.set(drain_key(self.prefix, address), "%.6f" % (time.time() if at is None else at), ex=int(ttl))

    def cancel_drain(self, address: str) -> None:
        self.client.delete(drain_key(self.prefix, address))


def group_instances(workers: Iterable[Mapping[str, Any]]) -> list[Instance]:
    by_address: dict[str, Instance] = {}
    for worker in workers:
        address = str(worker.get("address", ""))
        by_address.setdefault(address, Instance(address)).workers.append(dict(worker))
    return [by_address[a] for a in sorted(by_address)]


# --------------------------------------------------------------------------- choosing


def choose_instance(
    candidates: Sequence[Instance],
    *,
    pending: Mapping[str, int] | None = None,
    rng: random.Random | None = None,
) -> Instance | None:
    """Return the ready instance with the fewest connections, or None if none is ready.

    Args:
        candidates: the instances the registry shows.
        pending: hand-overs this process made to each address since the registry
            was read (the snapshots do not count them yet): without them, every
            handshake until the next read would go to the same instance.
        rng: breaks ties at random (so that front processes do not all pick the
            same instance).
    """
    pending = pending or {}
    ready = [i for i in candidates if i.ready]
    if not ready:
        return None
    rng = rng or random
    return min(ready, key=lambda i: (i.connections + pending.get(i.address, 0), rng.random()))


# --------------------------------------------------------------------------- drain


def drain_schedule(count: int, window: float, rng: random.Random | None = None) -> list[float]:
    """Seconds after the start of a drain at which to close each of ``count`` connections.

    The window is cut into ``count`` equal slots and each close falls at a random
    point of its own slot: the closes are spread evenly (at most about two per slot
    length in any slot length, whatever the draw) with jitter, so that clients do not
    reconnect in step. Sorted, all within ``[0, window)``.
    """
    if count <= 0:
        return []
    rng = rng or random
    slot = window / count
    return [slot * (i + rng.random()) for i in range(count)]


# --------------------------------------------------------------------------- metrics


def merge_snapshots(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum the figures of several workers' snapshots into one."""
    total: dict[str, Any] = {
        "connections": {},
        "subscriptions": 0,
        "channels": 0,
        "queue_bytes": 0,
        "redis_reconnects": 0,
        "redis_errors": 0,
        "workers": 0,
        "ready": False,
        "stats": Stats().as_dict(),
        "top": {},
    }
    stats = total["stats"]
    for snap in snapshots:
        total["workers"] += 1
        total["ready"] = total["ready"] or bool(snap.get("ready"))
        for transport, n in snap.get("connections", {}).items():
            total["connections"][transport] = total["connections"].get(transport, 0) + n
        for key in ("subscriptions", "channels", "queue_bytes", "redis_reconnects", "redis_errors"):
            total[key] += snap.get(key, 0)
        for label, n in snap.get("top", []):
            total["top"][label] = total["top"].get(label, 0) + n
        theirs = snap.get("stats", {})
        for key, value in theirs.items():
            if isinstance(value, dict):
                mine = stats[key]
                for k, v in value.items():
                    mine[k] = mine.get(k, 0) + v
            elif isinstance(value, list):
                stats[key] = [a + b for a, b in zip(stats[key], value, strict=False)]
            else:
                stats[key] = stats.get(key, 0) + value
    return total


# Every metric the websocket instance exports: name -> (type, help). The Grafana
# dashboard in docs/ is checked against this list.
METRICS: dict[str, tuple[str, str]] = {
    "django_ws_connections": ("gauge", "Open connections, by transport (websocket, eventstream)."),
    "django_ws_handshakes_total": ("counter", "Connections accepted."),
    "django_ws_handshakes_refused_total": ("counter", "Connections refused, by reason."),
    "django_ws_subscriptions": ("gauge", "Channel subscriptions of the open connections."),
    "django_ws_channels": ("gauge", "Channels the instance's workers are subscribed to in Redis (summed over workers)."),
    "django_ws_messages_delivered_total": ("counter", "Live messages written to clients."),
    "django_ws_messages_received_total": ("counter", "Messages clients sent for publishing."),
    "django_ws_messages_published_total": ("counter", "Client messages published to Redis."),
    "django_ws_publish_errors_total": ("counter", "Client messages that could not be published (Redis)."),
    "django_ws_bytes_sent_total": ("counter", "Bytes queued for clients (frames of every kind)."),
    "django_ws_closes_total": ("counter", "Connections closed by the server, by close code."),
    "django_ws_slow_consumers_total": ("counter", "Connections cut because their send queue overflowed (4008)."),
    "django_ws_recoveries_total": ("counter", "Recovery attempts, by outcome (recovered, not_recovered)."),
    "django_ws_redis_reconnects_total": ("counter", "Reconnections of the Hub's Redis subscriber connection."),
    "django_ws_redis_errors_total": ("counter", "Errors on the Hub's Redis subscriber connection."),
    "django_ws_send_queue_bytes": ("gauge", "Bytes waiting in the connections' send queues."),
    "django_ws_delivery_lag_seconds": ("histogram", "From the publish call to the write to the client's socket."),
    "django_ws_workers": ("gauge", "Live workers of this instance."),
    "django_ws_ready": ("gauge", "1 if the instance takes connections."),
}


def metric_families(total: Mapping[str, Any]) -> list[Any]:
    """Build prometheus_client metric families from :func:`merge_snapshots`' result."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    def counter(name: str, value: float) -> CounterMetricFamily:
        # prometheus_client appends _total to a counter's samples itself.
        return CounterMetricFamily(name[: -len("_total")], METRICS[name][1], value=value)

    def labelled(name: str, label: str, values: Mapping[str, float]) -> CounterMetricFamily:
        family = CounterMetricFamily(name[: -len("_total")], METRICS[name][1], labels=[label])
        for key in sorted(values):
            family.add_metric([str(key)], values[key])
        return family

    def gauge(name: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, METRICS[name][1], value=value)

    stats = total["stats"]
    connections = GaugeMetricFamily("django_ws_connections", METRICS["django_ws_connections"][1], labels=["transport"])
    for transport in ("websocket", "eventstream"):
        connections.add_metric([transport], total["connections"].get(transport, 0))
    buckets = []
    running = 0
    for bound, n in zip((*LAG_BUCKETS, float("inf")), stats["lag_counts"], strict=True):
        running += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    lag = HistogramMetricFamily(
        "django_ws_delivery_lag_seconds",
        METRICS["django_ws_delivery_lag_seconds"][1],
        buckets=buckets,
        sum_value=stats["lag_sum"],
    )
    return [
        connections,
        counter("django_ws_handshakes_total", stats["handshakes"]),
        labelled("django_ws_handshakes_refused_total", "reason", stats["refused"]),
        gauge("django_ws_subscriptions", total["subscriptions"]),
        gauge("django_ws_channels", total["channels"]),
        counter("django_ws_messages_delivered_total", stats["delivered"]),
        counter("django_ws_messages_received_total", stats["received"]),
        counter("django_ws_messages_published_total", stats["published"]),
        counter("django_ws_publish_errors_total", stats["publish_errors"]),
        counter("django_ws_bytes_sent_total", stats["bytes_sent"]),
        labelled("django_ws_closes_total", "code", stats["closes"]),
        counter("django_ws_slow_consumers_total", stats["slow_consumers"]),
        labelled(
            "django_ws_recoveries_total",
            "outcome",
            {"recovered": stats["recovered"], "not_recovered": stats["not_recovered"]},
        ),
        counter("django_ws_redis_reconnects_total", total["redis_reconnects"]),
        counter("django_ws_redis_errors_total", total["redis_errors"]),
        gauge("django_ws_send_queue_bytes", total["queue_bytes"]),
        lag,
        gauge("django_ws_workers", total["workers"]),
        gauge("django_ws_ready", 1 if total["ready"] else 0),
    ]


def render_metrics(total: Mapping[str, Any]) -> tuple[bytes, str]:
    """Return the Prometheus text exposition of ``total`` and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    class _Collector:
        def collect(self) -> list[Any]:
            return metric_families(total)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
