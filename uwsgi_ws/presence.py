"""Presence: who is connected to each channel, across every instance and worker.

Redis keeps, per logical channel (all under the channel's hash tag, so each script
below touches one Cluster slot)::

    {prefix:facility:audience}:members   hash: "<worker>:<connection>" -> entry (JSON)
    {prefix:facility:audience}:workers   sorted set: worker -> lease end (ms, Redis clock)
    {prefix:facility:audience}:users     hash: username -> connections ("" counts anonymous ones)
    {prefix:facility:audience}:presence  pub/sub channel of the join/leave events

and, per project, ``{prefix:presence}`` (channels -> the latest lease among their
workers, to find channels whose workers all died) and ``{prefix:presence-events}``
(a bounded stream of the changes, which ``manage.py ws_events`` consumes).

A join or a leave is one script call, O(1). Each worker renews its lease on the
channels it holds connections in every third of the TTL (one call per channel, not
per connection); a worker that dies without leaving stops renewing, and the next
renewal of another worker in the same channel, or the sweep of the project's index
(every worker and every ``ws_events`` runs it), removes its entries and produces
the leaves. So a dead worker's members are gone within the TTL plus one renewal
interval. The users hash counts connections per user: only the first connection of
a user joins and only the last one leaves, whatever the number of tabs.

Nothing here imports Django: the websocket instance writes, both sides read.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import RedisClusterException, RedisError

from .exceptions import PublishError, RedisUnavailable
from .protocol import (
    KIND_JSON,
    log_key,
    members_key,
    meta_key,
    presence_events_key,
    presence_index_key,
    users_key,
    workers_key,
)
from .protocol import presence_channel as events_channel
from .store import _PUBLISH, _Script, _text

logger = logging.getLogger(__name__)

__all__ = ["Change", "Member", "Occupancy", "PresenceTracker", "Roster", "count", "read", "sweep"]

# KEYS: members, workers, users. ARGV: field, entry, username ('' anonymous), worker,
# ttl in ms. Returns {joined (first connection of a named user), occupied (first
# connection of the channel), lease end}. Joining twice with the same field does
# nothing, so a retried call cannot count a connection twice.
JOIN_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[5])
local lease = string.format('%d', now + ttl)
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return {0, 0, lease}
end
redis.call('ZADD', KEYS[2], lease, ARGV[4])
local joined = 0
if redis.call('HINCRBY', KEYS[3], ARGV[3], 1) == 1 and ARGV[3] ~= '' then
  joined = 1
end
local occupied = 0
if redis.call('HLEN', KEYS[1]) == 1 then
  occupied = 1
end
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], ttl * 3)
end
return {joined, occupied, lease}
"""

# KEYS: members, workers, users. ARGV: field, username. Returns {left (the user's
# last connection), vacated (the channel's last one)}.
LEAVE_LUA = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return {0, 0}
end
local left = 0
if redis.call('HINCRBY', KEYS[3], ARGV[2], -1) <= 0 then
  redis.call('HDEL', KEYS[3], ARGV[2])
  if ARGV[2] ~= '' then
    left = 1
  end
end
local vacated = 0
if redis.call('HLEN', KEYS[1]) == 0 then
  vacated = 1
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
end
return {left, vacated}
"""

# KEYS: members, workers, users. ARGV: worker ('' to renew nothing), ttl in ms.
# Renews the worker's lease, then removes the entries of every worker whose lease
# ended (one pass over the members, only when there is such a worker).
# Returns {workers left, vacated, latest lease end, users who left...}.
TOUCH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[2], string.format('%d', now + ttl), ARGV[1])
  for i = 1, 3 do
    redis.call('PEXPIRE', KEYS[i], ttl * 3)
  end
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
local out = {0, 0, '0'}
if #dead > 0 then
  local gone = {}
  for _, w in ipairs(dead) do
    gone[w] = true
    redis.call('ZREM', KEYS[2], w)
  end
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local w = string.match(all[i], '^([^:]*):')
    if w and gone[w] then
      redis.call('HDEL', KEYS[1], all[i])
      local ok, entry = pcall(cjson.decode, all[i + 1])
      local user = ''
      if ok and type(entry) == 'table' and type(entry['u']) == 'string' then
        user = entry['u']
      end
      if redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
        redis.call('HDEL', KEYS[3], user)
        if user ~= '' then
          table.insert(out, user)
        end
      end
    end
  end
  if redis.call('HLEN', KEYS[1]) == 0 then
    out[2] = 1
    redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  end
end
out[1] = redis.call('ZCARD', KEYS[2])
local latest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if #latest == 2 then
  out[3] = latest[2]
end
return out
"""

# KEYS: the project's index. ARGV: how many channels at most.
# Returns the channels whose every lease ended: all their workers are gone.
SWEEP_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
"""

# KEYS: the project's index. ARGV: channel. Forgets the channel if no lease of it is
# still running (a join elsewhere since the sweep read it renewed it).
FORGET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: members, workers. The members and the workers still alive, read at once.
READ_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf'), redis.call('HGETALL', KEYS[1])}
"""

_JOIN = _Script(JOIN_LUA)
_LEAVE = _Script(LEAVE_LUA)
_TOUCH = _Script(TOUCH_LUA)
_SWEEP = _Script(SWEEP_LUA)
_FORGET = _Script(FORGET_LUA)
_READ = _Script(READ_LUA)

#: Channels reaped per sweep of a project's index.
SWEEP_BATCH = 100
#: Seconds the events channel's counters live (it keeps no history).
EVENTS_TTL = 900.0


def _keys(channel: str) -> tuple[str, str, str]:
    return members_key(channel), workers_key(channel), users_key(channel)


def _redis_error(exc: Exception) -> bool:
    return isinstance(exc, (RedisError, RedisClusterException))


# --------------------------------------------------------------------------- reads


@dataclass(frozen=True)
class Member:
    """One user connected to a channel.

    Attributes:
        user: the username.
        connections: how many connections (tabs) the user has in the channel.
        since: Unix time of the user's earliest connection among them.
        info: what ``PRESENCE_INFO`` returned for that earliest connection (or None).
    """

    user: str
    connections: int
    since: float
    info: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.user, "connections": self.connections, "since": self.since, "info": self.info}


@dataclass(frozen=True)
class Roster:
    """Who is connected to a channel now: its members, and the anonymous connections
    (counted, never listed)."""

    members: tuple[Member, ...]
    anonymous: int

    @property
    def connections(self) -> int:
        return self.anonymous + sum(m.connections for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {
            "members": [m.to_dict() for m in self.members],
            "users": len(self.members),
            "anonymous": self.anonymous,
            "connections": self.connections,
        }


@dataclass(frozen=True)
class Occupancy:
    """The cheap count of a channel: connections, named users, anonymous connections."""

    connections: int
    users: int
    anonymous: int


def read(client: redis.Redis, channel: str) -> Roster:
    """Return who is connected to ``channel``, in one round trip, O(members).

    Entries of a worker whose lease ended are left out even before they are removed.

    Raises:
        RedisUnavailable: Redis could not be reached.
    """
    try:
        [(alive, flat)] = _READ.run_many(client, [((members_key(channel), workers_key(channel)), ())])
    except (RedisError, RedisClusterException) as exc:
        raise RedisUnavailable(f"could not read presence: Redis error {type(exc).__name__}") from exc
    living = {_text(w) for w in alive}
    users: dict[str, list[Any]] = {}
    anonymous = 0
    for i in range(0, len(flat), 2):
        worker = _text(flat[i]).split(":", 1)[0]
        if worker not in living:
            continue
        try:
            entry = json.loads(flat[i + 1])
            user, since, info = entry["u"], float(entry["t"]), entry.get("i")
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(user, str) or not user:
            anonymous += 1
            continue
        seen = users.get(user)
        if seen is None:
            users[user] = [1, since, info]
        else:
            seen[0] += 1
            if since < seen[1]:
                seen[1], seen[2] = since, info
    members = tuple(Member(u, n, since, info) for u, (n, since, info) in sorted(users.items()))
    return Roster(members, anonymous)


def count(client: redis.Redis, channel: str) -> Occupancy:
    """Return how many connections and users ``channel`` has, in O(1).

    Unlike :func:`read`, entries of a dead worker count until they are removed
    (within the TTL).

    Raises:
        RedisUnavailable: Redis could not be reached.
    """
    pipe = client.pipeline(transaction=False)
    pipe.hlen(members_key(channel))
    pipe.hlen(users_key(channel))
    pipe.hget(users_key(channel), "")
    try:
        connections, named, anonymous = pipe.execute()
    except (RedisError, RedisClusterException) as exc:
        raise RedisUnavailable(f"could not count presence: Redis error {type(exc).__name__}") from exc
    anonymous = int(anonymous or 0)
    return Occupancy(int(connections), int(named) - (1 if anonymous else 0), anonymous)


# --------------------------------------------------------------------------- changes


@dataclass(frozen=True)
class Change:
    """One presence change: ``joined`` / ``left`` (a user), ``occupied`` / ``vacated``
    (a channel's first and last connection)."""

    kind: str
    channel: str
    user: str = ""
    info: Any = None


def publish_call(channel: str, kind: bytes, payload: bytes, publish_command: str) -> tuple[tuple[str, ...], tuple]:
    """The publish script's call for one message kept in no history (see Store.publish)."""
    ttl_ms = int(EVENTS_TTL * 1000)
    return (meta_key(channel), log_key(channel), channel), (b"", kind, payload, 0, ttl_ms, publish_command, 0)


def emit(
    client: redis.Redis,
    changes: Sequence[Change],
    *,
    prefix: str,
    stream_size: int,
    publish_command: str = "PUBLISH",
) -> None:
    """Tell the channels' listeners (join/leave events) and the project's stream.

    Raises:
        PublishError: Redis could not be reached.
    """
    if not changes:
        return
    # One round trip for every event, however many a reaping produced.
    calls = []
    for change in changes:
        if change.kind in ("joined", "left"):
            document = {"type": "join" if change.kind == "joined" else "leave", "user": change.user}
            if change.kind == "joined":
                document["info"] = change.info
            payload = json.dumps(document, separators=(",", ":")).encode("utf-8")
            calls.append(publish_call(events_channel(change.channel), KIND_JSON, payload, publish_command))
    try:
        _PUBLISH.run_many(client, calls)
    except (RedisError, RedisClusterException) as exc:
        raise PublishError(f"could not announce presence changes: Redis error {type(exc).__name__}") from exc
    if stream_size > 0:
        pipe = client.pipeline(transaction=False)
        stamp = repr(time.time())
        for change in changes:
            fields: dict[Any, Any] = {"type": change.kind, "channel": change.channel, "user": change.user, "at": stamp}
            if change.info is not None:
                fields["info"] = json.dumps(change.info, separators=(",", ":"))
            pipe.xadd(presence_events_key(prefix), fields, maxlen=stream_size, approximate=True)
        try:
            pipe.execute()
        except (RedisError, RedisClusterException) as exc:
            raise PublishError(f"could not record presence changes: Redis error {type(exc).__name__}") from exc


def _touched(channel: str, result: Sequence[Any]) -> tuple[int, int, list[Change]]:
    """Read a TOUCH_LUA answer: (workers left, latest lease, the changes)."""
    workers, vacated, latest = int(result[0]), int(result[1]), int(float(_text(result[2])))
    changes = [Change("left", channel, _text(u)) for u in result[3:]]
    if vacated:
        changes.append(Change("vacated", channel))
    return workers, latest, changes


def sweep(
    client: redis.Redis, prefix: str, *, stream_size: int, publish_command: str = "PUBLISH", limit: int = SWEEP_BATCH
) -> list[Change]:
    """Remove the entries of the channels whose every worker is gone; emit the leaves.

    Several processes may sweep at once: each dead entry is removed, and its leave
    produced, by exactly one of them.

    Raises:
        RedisUnavailable: Redis could not be reached.
    """
    index = presence_index_key(prefix)
    try:
        [names] = _SWEEP.run_many(client, [((index,), (str(limit),))])
        channels = [_text(n) for n in names]
        results = _TOUCH.run_many(client, [(_keys(c), ("", "0")) for c in channels])
        changes: list[Change] = []
        forget = []
        for channel, result in zip(channels, results, strict=True):
            workers, _, found = _touched(channel, result)
            changes += found
            if workers == 0:
                forget.append(((index,), (channel,)))
        _FORGET.run_many(client, forget)
    except (RedisError, RedisClusterException) as exc:
        raise RedisUnavailable(f"could not sweep presence: Redis error {type(exc).__name__}") from exc
    try:
        emit(client, changes, prefix=prefix, stream_size=stream_size, publish_command=publish_command)
    except PublishError as exc:
        logger.warning("could not announce %d presence change(s): %s", len(changes), exc)
    return changes


# --------------------------------------------------------------------------- the worker's side


@dataclass
class _Held:
    """What this worker holds in one channel."""

    ttl: float
    stream_size: int
    connections: set[str] = field(default_factory=set)


class PresenceTracker:
    """Write this worker's connections into presence and keep its leases alive.

    Args:
        client: the worker's Redis client.
        prefix: the project's Redis prefix (names its index and stream).
        publish_command: ``PUBLISH`` or ``SPUBLISH``, for the join/leave events.
        worker: this worker's id in the entries (random by default).
        background: renew the leases in a thread of its own, started by the first
            join; False leaves calling :meth:`renew` to the caller.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        *,
        publish_command: str = "PUBLISH",
        worker: str | None = None,
        background: bool = True,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.publish_command = publish_command
        self.worker = worker or os.urandom(6).hex()
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._background = background
        # The stream size of the latest join: the leaves of a sweep go to the stream
        # even when this worker holds no connection any more.
        self._stream_size = 0

    def _emit(self, changes: list[Change], stream_size: int) -> None:
        try:
            emit(
                self.client, changes, prefix=self.prefix, stream_size=stream_size, publish_command=self.publish_command
            )
        except PublishError as exc:
            logger.warning("could not announce %d presence change(s): %s", len(changes), exc)

    def join(
        self,
        connection: str,
        channels: Iterable[str],
        *,
        user: str,
        info: Any,
        ttl: float,
        stream_size: int,
        since: float,
    ) -> None:
        """Enter ``connection`` (of ``user``, '' for anonymous) into each channel's presence.

        Raises:
            RedisUnavailable: Redis could not be reached (nothing is announced).
        """
        channels = list(dict.fromkeys(channels))
        if not channels:
            return
        self._start()
        ttl_ms = max(1000, int(ttl * 1000))
        entry = json.dumps({"u": user, "t": round(since, 3), "i": info}, separators=(",", ":"))
        name = f"{self.worker}:{connection}"
        new = set()  # channels this worker had no connection in: the index must know them
        self._stream_size = stream_size
        with self._lock:
            for channel in channels:
                held = self._held.get(channel)
                if held is None:
                    held = self._held[channel] = _Held(ttl, stream_size)
                    new.add(channel)
                held.ttl = min(held.ttl, ttl)
                held.connections.add(connection)
        calls = [(_keys(c), (name, entry, user, self.worker, str(ttl_ms))) for c in channels]
        try:
            results = _JOIN.run_many(self.client, calls)
            # Other joins skip this round trip: the renewals keep the index up to date,
            # and a sweep of a channel some of whose workers still live removes nothing
            # of theirs.
            if new:
                pipe = self.client.pipeline(transaction=False)
                for channel, (_, _, lease) in zip(channels, results, strict=True):
                    if channel in new:
                        pipe.zadd(presence_index_key(self.prefix), {channel: int(_text(lease))}, gt=True)
                pipe.execute()
        except (RedisError, RedisClusterException) as exc:
            self._forget(connection, channels)
            raise RedisUnavailable(f"could not record presence: Redis error {type(exc).__name__}") from exc
        changes = []
        for channel, (joined, occupied, _) in zip(channels, results, strict=True):
            if int(occupied):
                changes.append(Change("occupied", channel))
            if int(joined):
                changes.append(Change("joined", channel, user, info))
        self._emit(changes, stream_size)
        self._wake.set()  # a shorter ttl may need an earlier renewal

    def leave(self, connection: str, channels: Iterable[str], *, user: str, stream_size: int) -> None:
        """Remove ``connection`` from each channel's presence; never raises.

        If Redis cannot be reached, the entries stay until this worker's lease on the
        channel ends, as if the worker had died.
        """
        channels = list(dict.fromkeys(channels))
        if not channels:
            return
        self._forget(connection, channels)
        name = f"{self.worker}:{connection}"
        try:
            results = _LEAVE.run_many(self.client, [(_keys(c), (name, user)) for c in channels])
        except (RedisError, RedisClusterException) as exc:
            logger.warning("could not remove a connection from presence: Redis error %s", type(exc).__name__)
            return
        changes = []
        for channel, (left, vacated) in zip(channels, results, strict=True):
            if int(left):
                changes.append(Change("left", channel, user))
            if int(vacated):
                changes.append(Change("vacated", channel))
        self._emit(changes, stream_size)

    def _forget(self, connection: str, channels: list[str]) -> None:
        with self._lock:
            for channel in channels:
                held = self._held.get(channel)
                if held is not None:
                    held.connections.discard(connection)
                    if not held.connections:
                        del self._held[channel]

    # ----------------------------------------------------------------- leases

    @property
    def interval(self) -> float:
        """Seconds between renewals: a third of the shortest TTL held."""
        with self._lock:
            ttls = [h.ttl for h in self._held.values()]
        return max(0.2, min(ttls) / 3) if ttls else 10.0

    def renew(self) -> list[Change]:
        """Renew this worker's leases, remove dead workers' entries, sweep the index."""
        with self._lock:
            held = [(c, h.ttl, h.stream_size) for c, h in self._held.items()]
        changes: list[Change] = []
        stream_size = max((s for _, _, s in held), default=self._stream_size)
        if held:
            calls = [(_keys(c), (self.worker, str(max(1000, int(ttl * 1000))))) for c, ttl, _ in held]
            try:
                results = _TOUCH.run_many(self.client, calls)
                pipe = self.client.pipeline(transaction=False)
                for (channel, _, _), result in zip(held, results, strict=True):
                    _, latest, found = _touched(channel, result)
                    changes += found
                    pipe.zadd(presence_index_key(self.prefix), {channel: latest}, gt=True)
                pipe.execute()
            except (RedisError, RedisClusterException) as exc:
                logger.warning("could not renew presence leases: Redis error %s", type(exc).__name__)
                return changes
            self._emit(changes, stream_size)
        try:
            changes += sweep(self.client, self.prefix, stream_size=stream_size, publish_command=self.publish_command)
        except RedisUnavailable as exc:
            logger.warning("%s", exc)
        return changes

    def _start(self) -> None:
        if self._thread is not None or not self._background:
            return
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._renew_forever, name="django_ws-presence", daemon=True)
        self._thread.start()

    def _renew_forever(self) -> None:
        next_at = time.monotonic() + self.interval
        while not self._stopping:
            self._wake.wait(max(0.0, next_at - time.monotonic()))
            self._wake.clear()
            if self._stopping:
                return
            now = time.monotonic()
            if now < next_at:
                next_at = min(next_at, now + self.interval)
                continue
            try:
                self.renew()
            except Exception:
                logger.exception("presence renewal failed")
            next_at = time.monotonic() + self.interval

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
