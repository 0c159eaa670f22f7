"""Sharded pub/sub on a Redis Cluster: one subscriber connection per master in use.

With ``SPUBLISH`` a Cluster carries a channel's messages only through the shard
(master and replicas) that owns the channel's slot, so a worker must listen on that
master. :class:`ShardedHub` keeps one :class:`~uwsgi_ws.hub.Hub` per master that owns
at least one channel the worker listens to (never one per channel or per socket) and
routes each channel by the key slot of its name: every key and the pub/sub channel of
one logical channel share a hash tag, so the publish script, which runs on the master
of its keys, and the subscription meet on the same node.

The slot map changes under it in two ways, and the channels follow:

- a slot is migrated (``CLUSTER SETSLOT``): the old owner pushes a ``sunsubscribe``;
  the Hub subscribes again on the same connection, the node answers ``MOVED`` with
  the new owner, and the channels move to the new owner's Hub;
- a master fails and its replica is promoted: the Hub's connection breaks; the slot
  map is read again (every ``refresh_interval`` seconds while a Hub is down) and the
  channels whose slot has a new owner move to it.

A moved channel keeps its listeners and the last position delivered; its new Hub
holds live messages, reads what was published meanwhile from history once the
subscription is confirmed, and delivers it in order without duplicates (the same
path as after any reconnection, see :mod:`uwsgi_ws.hub`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from redis.connection import Connection
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import RedisError

from .exceptions import SubscribeTimeout
from .hub import Hub, Listener, _confirmed_all

if TYPE_CHECKING:
    from .ops import Stats
    from .protocol import Position
    from .store import ChannelState, Store

logger = logging.getLogger(__name__)

Address = tuple[str, int]

__all__ = ["ShardedHub", "parse_slots"]


def parse_slots(reply: Any, queried: Address) -> tuple[list[tuple[int, int, Address]], list[Address]]:
    """Turn a ``CLUSTER SLOTS`` reply into (first slot, last slot, master address)
    ranges, and the addresses of every node named (replicas too).

    A node that does not know its own address answers an empty host (or ``?``):
    that is the node queried.
    """
    ranges = []
    nodes: dict[Address, None] = {}
    for entry in reply or ():
        first, last = int(entry[0]), int(entry[1])
        addresses = []
        for node in entry[2:]:
            host = node[0].decode("utf-8") if isinstance(node[0], bytes) else str(node[0])
            addresses.append((queried[0] if host in ("", "?") else host, int(node[1])))
        if addresses:
            ranges.append((first, last, addresses[0]))
            nodes.update(dict.fromkeys(addresses))
    return ranges, list(nodes)


class ShardedHub:
    """Fan messages out from one sharded subscription per Cluster master in use.

    Same interface as :class:`~uwsgi_ws.hub.Hub`.

    Args:
        seeds: some Cluster nodes (``host``, ``port``) to read the slot map from.
        connect: returns a new, unconnected redis-py ``Connection`` to a node.
        store: reads channel history after a move or a reconnection.
        ping_interval, max_backoff: as for :class:`~uwsgi_ws.hub.Hub`.
        refresh_interval: seconds between readings of the slot map while a
            master's Hub is disconnected (a failover may be under way).
    """

    def __init__(
        self,
        seeds: Iterable[Address],
        connect: Callable[[str, int], Connection],
        *,
        store: Store | None = None,
        ping_interval: float = 10.0,
        max_backoff: float = 5.0,
        refresh_interval: float = 0.5,
        stats: Stats | None = None,
    ) -> None:
        self._seeds = list(seeds)
        # Every node seen in a slot map, replicas too: after a failover the seeds
        # and the failed master may all be gone, a promoted replica is not.
        self._known: list[Address] = []
        if not self._seeds:
            raise ValueError("a ShardedHub needs at least one Cluster node to start from")
        self._connect = connect
        self._store = store
        self._stats = stats
        self._ping_interval = ping_interval
        self._max_backoff = max_backoff
        self._refresh_interval = refresh_interval
        self._slots: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._hubs: dict[Address, Hub] = {}
        # Which Hub holds each channel: a channel is in exactly one Hub at a time.
        self._where: dict[str, Address] = {}
        self._lock = threading.Lock()  # guards the state above; never held across I/O
        self._map_lock = threading.Lock()  # one slot map reading at a time
        self._mapped = False
        self._hints: list[tuple[list[str], Address]] = []  # MOVED answers to apply
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Counters of Hubs already stopped, so the totals below never go back.
        self._done = {"reconnects": 0, "resync_reads": 0, "listener_errors": 0, "errors": 0}
        #: Channels moved from one master's Hub to another's.
        self.moves = 0
        #: Readings of the Cluster's slot map.
        self.map_reads = 0

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the routing thread (idempotent); the per-master Hubs start as needed."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._route_forever, name="django_ws-shards", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop every Hub and the routing thread."""
        self._stopping = True
        self._wanted.set()
        with self._lock:
            hubs = list(self._hubs.values())
        for hub in hubs:
            hub.stop()

    # ----------------------------------------------------------------- figures

    @property
    def channel_count(self) -> int:
        return len(self._where)

    @property
    def nodes(self) -> list[Address]:
        """The masters this worker holds a subscriber connection to."""
        with self._lock:
            return sorted(self._hubs)

    def _total(self, name: str) -> int:
        with self._lock:
            return self._done[name] + sum(getattr(hub, name) for hub in self._hubs.values())

    @property
    def reconnects(self) -> int:
        return self._total("reconnects")

    @property
    def errors(self) -> int:
        return self._total("errors")

    @property
    def connected(self) -> bool:
        """Every node connection this worker needs is up (True while it needs none)."""
        with self._lock:
            return all(hub.connected for hub in self._hubs.values())

    def subscriptions(self) -> int:
        """The listeners of every channel, summed over the nodes."""
        with self._lock:
            hubs = list(self._hubs.values())
        return sum(hub.subscriptions() for hub in hubs)

    def busiest(self, count: int) -> list[tuple[str, int]]:
        """The ``count`` channels with the most local listeners, over every node."""
        with self._lock:
            hubs = list(self._hubs.values())
        sizes = [item for hub in hubs for item in hub.busiest(count)]
        sizes.sort(key=lambda item: (-item[1], item[0]))
        return sizes[:count]

    def recent(self, channel: str, since: Position, *, wait: float = 2.0) -> ChannelState | None:
        """What the node Hub of ``channel`` delivered after ``since`` (see Hub.recent)."""
        with self._lock:
            where = self._where.get(channel)
            hub = self._hubs.get(where) if where is not None else None
        return None if hub is None else hub.recent(channel, since, wait=wait)

    @property
    def resync_reads(self) -> int:
        return self._total("resync_reads")

    @property
    def listener_errors(self) -> int:
        return self._total("listener_errors")

    def position(self, channel: str) -> Position | None:
        with self._lock:
            where = self._where.get(channel)
            hub = self._hubs.get(where) if where is not None else None
        return None if hub is None else hub.position(channel)

    # ----------------------------------------------------------------- listeners

    def subscribe(self, listener: Listener, channels: Iterable[str], *, timeout: float = 10.0) -> None:
        """Register ``listener`` for ``channels`` (on their masters) and wait until
        Redis confirms them.

        Raises:
            SubscribeTimeout: not confirmed within ``timeout`` seconds (or the slot
                map could not be read); the listener is then unregistered again.
        """
        self.start()
        channels = list(dict.fromkeys(channels))
        deadline = time.monotonic() + timeout
        if not self._mapped and not self._read_map():
            raise SubscribeTimeout()
        sends = []
        waits = []
        with self._lock:
            plan: dict[Address, list[str]] = {}
            for name in channels:
                where = self._where.get(name) or self._owner(name)
                if where is None:
                    continue  # an unassigned slot: waits below, times out
                plan.setdefault(where, []).append(name)
            for where, names in plan.items():
                hub = self._hub(where)
                new, states, send_now = hub._register(listener, names)
                for name in names:
                    self._where[name] = where
                if new and send_now:
                    sends.append((hub, new))
                waits.extend(states)
            complete = sum(len(names) for names in plan.values()) == len(channels)
        for hub, new in sends:
            hub._send(hub._sub, new)
        if not complete or not _confirmed_all(waits, deadline):
            self.unsubscribe(listener, channels)
            raise SubscribeTimeout()

    def unsubscribe(self, listener: Listener, channels: Iterable[str]) -> None:
        """Unregister ``listener``; channels without listeners are unsubscribed, and a
        master left without any loses its connection."""
        sends = []
        idle = []
        with self._lock:
            plan: dict[Address, list[str]] = {}
            for name in channels:
                where = self._where.get(name)
                if where is not None:
                    plan.setdefault(where, []).append(name)
            for where, names in plan.items():
                hub = self._hubs[where]
                gone, send_now = hub._unregister(listener, names)
                for name in gone:
                    del self._where[name]
                if not hub.channel_count:
                    idle.append(self._drop(where))
                elif gone and send_now:
                    sends.append((hub, gone))
        for hub, gone in sends:
            hub._send(hub._unsub, gone)
        for hub in idle:
            hub.stop()

    # ----------------------------------------------------------------- routing

    def _owner(self, name: str) -> Address | None:
        return self._slots[key_slot(name.encode("utf-8"))]

    def _hub(self, where: Address) -> Hub:
        """The Hub of the master at ``where``, made and started if needed (under _lock)."""
        hub = self._hubs.get(where)
        if hub is None:
            hub = self._hubs[where] = Hub(
                lambda: self._connect(*where),
                store=self._store,
                ping_interval=self._ping_interval,
                max_backoff=self._max_backoff,
                subscribe_command="SSUBSCRIBE",
                on_moved=self._moved,
                on_lost=self._wanted.set,
                stats=self._stats,
            )
            hub.start()
        return hub

    def _drop(self, where: Address) -> Hub:
        """Forget the Hub at ``where`` (under _lock); the caller stops it."""
        hub = self._hubs.pop(where)
        for name in self._done:
            self._done[name] += getattr(hub, name)
        return hub

    def _moved(self, names: list[str], where: Address) -> None:
        # Called by a Hub's reader: record and wake the routing thread, nothing more.
        with self._lock:
            self._hints.append((names, where))
        self._wanted.set()

    def _route_forever(self) -> None:
        while not self._stopping:
            with self._lock:
                down = any(not hub.connected for hub in self._hubs.values())
            self._wanted.wait(self._refresh_interval if down else None)
            self._wanted.clear()
            if self._stopping:
                return
            try:
                self._route()
            except Exception:
                logger.exception("could not route the sharded subscriptions; trying again")
                time.sleep(self._refresh_interval)

    def _route(self) -> None:
        with self._lock:
            hints, self._hints = self._hints, []
            down = any(not hub.connected for hub in self._hubs.values())
        if down:
            self._read_map()
        with self._lock:
            # A MOVED answer is the owner's own word, newer than any map read before it.
            for names, where in hints:
                for name in names:
                    self._slots[key_slot(name.encode("utf-8"))] = where
            moves: dict[tuple[Address, Address], list[str]] = {}
            for name, where in self._where.items():
                owner = self._owner(name)
                if owner is not None and owner != where:
                    moves.setdefault((where, owner), []).append(name)
            sends = []
            idle = []
            for (source, target), names in moves.items():
                states = self._hubs[source]._take(names)
                hub = self._hub(target)
                adopted, send_now = hub._adopt(states)
                for name in adopted:
                    self._where[name] = target
                self.moves += len(adopted)
                if adopted and send_now:
                    sends.append((hub, adopted))
                logger.info("%d channel(s) moved from %s:%d to %s:%d", len(adopted), *source, *target)
            for where in [w for w, hub in self._hubs.items() if not hub.channel_count]:
                idle.append(self._drop(where))
        for hub, names in sends:
            hub._send(hub._sub, names)
        for hub in idle:
            hub.stop()

    def _read_map(self) -> bool:
        """Read the slot map from the first node that answers; False if none did."""
        with self._map_lock:
            with self._lock:
                known = list(dict.fromkeys([*self._known, *self._seeds]))
            for where in known:
                conn = self._connect(*where)
                try:
                    conn.connect()
                    conn.send_command("CLUSTER", "SLOTS")
                    ranges, nodes = parse_slots(conn.read_response(), where)
                except (RedisError, OSError) as exc:
                    logger.debug("could not read the slot map from %s:%d: %s", *where, exc)
                    continue
                finally:
                    conn.disconnect()
                if not ranges:
                    continue
                self.map_reads += 1
                slots: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
                for first, last, owner in ranges:
                    for slot in range(first, last + 1):
                        slots[slot] = owner
                with self._lock:
                    self._slots = slots
                    self._mapped = True
                    self._known = nodes
                return True
            logger.warning("no Redis Cluster node answered CLUSTER SLOTS (tried %d)", len(known))
            return False
