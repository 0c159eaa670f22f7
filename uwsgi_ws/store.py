"""Redis access shared by both sides: publishing with history, and reading it back.

Each logical channel's keys share one hash tag (see :mod:`uwsgi_ws.protocol`), so
each script below touches a single Redis Cluster slot.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from .exceptions import InvalidArgument, PublishError, RedisUnavailable
from .protocol import MAX_OFFSET, Envelope, Position, decode_envelope, log_key, meta_key, stamp_sender

logger = logging.getLogger(__name__)

# History reads sent in one pipeline (a batch of more goes in several).
_READS_PER_PIPELINE = 1000
# A read asked for within _STORM seconds of the last one waits _GATHER seconds for
# others to join it: during a reconnection storm, connections that come back from
# the same position on a channel then share its read. A lone read does not wait.
_STORM = 0.05
_GATHER = 0.005

# KEYS: meta hash, history stream, pub/sub channel.
# ARGV: sender, kind, payload, history size, ttl in ms, publish command, history
# byte cap (0: none).
# A missing meta hash means the channel is new or Redis lost it: start a new epoch
# (from the server clock, so it differs after a restart) and drop any stale history,
# whose ids would otherwise collide with the restarted offsets.
# The meta hash's 'bytes' is the summed length of the envelopes kept in the stream.
# The oldest entries go first, until both the count and the byte cap hold; a message
# larger than the cap by itself leaves the history empty, so a client that needed
# any of it is told honestly that it could not be recovered (its offsets are gone).
# A stream with no entries (expired on its own after history-less publishes) holds
# no bytes, whatever the counter says.
PUBLISH_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. '.' .. t[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
-- string.format keeps large offsets out of Lua's exponent notation
local id = string.format('%d', offset)
local envelope = ARGV[1] .. '\\n' .. ARGV[2] .. '\\n' .. id .. '\\n' .. epoch .. '\\n' .. ARGV[3]
local size = tonumber(ARGV[4])
if size > 0 then
  local cap = tonumber(ARGV[7])
  local count = redis.call('XLEN', KEYS[2])
  local kept = 0
  if count > 0 then
    local counted = redis.call('HGET', KEYS[1], 'bytes')
    if counted then
      kept = tonumber(counted)
    else
      -- history written before bytes were counted: count it once
      for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
        kept = kept + #entry[2][2]
      end
    end
  end
  redis.call('XADD', KEYS[2], id .. '-0', 'e', envelope)
  count = count + 1
  kept = kept + #envelope
  while count > 0 and (count > size or (cap > 0 and kept > cap)) do
    local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
    if #oldest == 0 then
      kept = 0
      break
    end
    kept = kept - #oldest[1][2][2]
    redis.call('XDEL', KEYS[2], oldest[1][1])
    count = count - 1
  end
  if count == 0 then
    kept = 0
  end
  redis.call('HSET', KEYS[1], 'bytes', string.format('%d', kept))
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local receivers = redis.call(ARGV[6], KEYS[3], envelope)
return {offset, epoch, receivers}
"""

# KEYS: one client's rate bucket (a hash: tokens, stamp).
# ARGV: tokens per second, burst.
# A token bucket refilled from the Redis server's clock, so every process and
# instance sharing the Redis shares one bucket per client whatever their clocks. A
# clock that steps back refills nothing. The key lives until the bucket would be full
# again: an absent bucket is a full one, so idle clients leave nothing behind.
# Returns {1, '0'} when a token was taken, else {0, seconds until the next one}.
RATE_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now
elseif now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate)
  stamp = now
end
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.6f', stamp))
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil((burst - tokens) / rate * 1000) + 1000))
return {allowed, string.format('%.6f', wait)}
"""

# KEYS: meta hash, history stream.
# ARGV: 'after', the first stream id to read and the epoch it must be in ('' for any);
# or 'latest' (the last entry), or 'none'.
# Reads the epoch, the last offset and the history in one atomic step, so a message
# published meanwhile is either in the answer or arrives later over pub/sub.
# History is returned only when it can help: in the client's epoch, and still
# holding the first message the client missed (otherwise nothing can be recovered,
# and sending the whole history to the worker would cost it for nothing); or, when
# the channel started a new epoch since (Redis lost its state), everything kept of
# the new one, which the client has never seen. The offset is returned as Redis
# stores it, a string: Lua numbers are doubles.
FETCH_LUA = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
if not meta[1] then
  return {false, '0', {}}
end
local entries = {}
if ARGV[1] == 'latest' then
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
elseif ARGV[1] == 'after' and (ARGV[3] == '' or ARGV[3] == meta[1]) then
  entries = redis.call('XRANGE', KEYS[2], ARGV[2], '+')
  if #entries > 0 and entries[1][1] ~= ARGV[2] then
    entries = {}
  end
elseif ARGV[1] == 'after' then
  entries = redis.call('XRANGE', KEYS[2], '-', '+')
end
local out = {}
for i, entry in ipairs(entries) do
  out[i] = entry[2][2]
end
return {meta[1], meta[2] or '0', out}
"""


@dataclass(frozen=True)
class Published:
    """Where one message landed: its channel, offset and epoch, and live receivers."""

    channel: str
    offset: int
    epoch: str
    receivers: int


@dataclass(frozen=True)
class ChannelState:
    """A channel's epoch (None if Redis holds nothing), last offset and kept history."""

    epoch: str | None
    top: int
    history: tuple[Envelope, ...]


class _Script:
    """A Lua script run with EVALSHA; where a server answers NOSCRIPT, with EVAL.

    EVAL also caches the script on the server that runs it, so each server (each
    master of a Cluster) gets the source once. Only the calls that got NOSCRIPT run
    again: the others did run, and publishing twice would duplicate messages.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def run_many(self, client: redis.Redis, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Run the script once per (keys, args), in one round trip when it is loaded."""
        if not calls:
            return []
        results = self._pipeline(client, calls, "EVALSHA", self.sha)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            again = self._pipeline(client, [calls[i] for i in missing], "EVAL", self.source)
            for i, r in zip(missing, again, strict=True):
                results[i] = r
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    @staticmethod
    def _pipeline(
        client: redis.Redis, calls: Sequence[tuple[Sequence[str], Sequence[Any]]], command: str, script: str
    ) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command(command, script, len(keys), *keys, *args)
        return list(pipe.execute(raise_on_error=False))


_PUBLISH = _Script(PUBLISH_LUA)
_FETCH = _Script(FETCH_LUA)
_RATE = _Script(RATE_LUA)


@dataclass(frozen=True)
class Allowance:
    """The answer of :meth:`Store.allow`: true when the client may publish now.

    Attributes:
        allowed: a token was taken; publish.
        retry_after: when refused, seconds until the next token (0.0 when allowed).
    """

    allowed: bool
    retry_after: float = 0.0

    def __bool__(self) -> bool:
        return self.allowed


class Store:
    """Publishes to channels and reads their history, through one Redis client.

    Args:
        client: a redis-py client (its pool bounds the connections used).
        publish_command: ``PUBLISH``, or ``SPUBLISH`` on a Redis Cluster.
    """

    def __init__(self, client: redis.Redis, *, publish_command: str = "PUBLISH") -> None:
        self.client = client
        self.publish_command = publish_command
        # History reads: the batch being gathered, and whether one is on its way.
        self._reads_lock = threading.Lock()
        self._next_batch: _ReadBatch | None = None
        self._reading = False
        self._last_read = -1.0

    def publish(
        self,
        channels: Iterable[str],
        kind: bytes,
        payload: bytes,
        *,
        sender: bytes = b"",
        history_size: int,
        history_ttl: float,
        history_max_bytes: int = 0,
    ) -> list[Published]:
        """Append to each channel's history and publish, in one round trip.

        Args:
            history_size: messages kept per channel (0: this one is not kept).
            history_ttl: seconds the channel's state lives after this message.
            history_max_bytes: bytes of envelopes kept per channel (0: no cap); the
                oldest go first, as with ``history_size``.

        Raises:
            PublishError: Redis could not be reached or refused the message.
        """
        channels = list(dict.fromkeys(channels))
        sender = stamp_sender(sender)
        ttl_ms = max(1, int(history_ttl * 1000))
        size, cap = max(0, int(history_size)), max(0, int(history_max_bytes))
        calls = [
            ((meta_key(c), log_key(c), c), (sender, kind, payload, size, ttl_ms, self.publish_command, cap))
            for c in channels
        ]
        try:
            results = _PUBLISH.run_many(self.client, calls)
        except (RedisError, RedisClusterException) as exc:  # the latter: a Cluster without a node
            raise PublishError(
                f"could not publish to {len(channels)} channel(s): Redis error {type(exc).__name__}"
            ) from exc
        return [Published(c, int(r[0]), _text(r[1]), int(r[2])) for c, r in zip(channels, results, strict=True)]

    def claim(self, key: str, ttl: float) -> bool:
        """Mark ``key`` as taken for ``ttl`` seconds; False if it already was.

        This is how a ticket is used once: its nonce is claimed with SET NX, and the
        mark outlives the ticket's validity.

        Raises:
            RedisUnavailable: Redis could not be reached, so nobody can tell.
        """
        try:
            return bool(self.client.set(key, b"1", nx=True, px=max(1000, int(ttl * 1000))))
        except (RedisError, RedisClusterException) as exc:
            raise RedisUnavailable(f"could not claim a ticket: Redis error {type(exc).__name__}") from exc

    def allow(self, key: str, *, rate: float, burst: int) -> Allowance:
        """Take one publish token from the bucket ``key``, if it has one.

        One token bucket per client, kept in Redis: every process and instance that
        shares the Redis shares the bucket, and the time comes from the Redis server,
        never from the caller's clock. An idle bucket expires once it would be full.

        Args:
            key: the bucket, from :func:`uwsgi_ws.protocol.rate_key` (prefix and
                client identity).
            rate: tokens added per second; ``0`` (or less) disables the limit and
                touches no Redis.
            burst: the bucket's size: how many messages may go at once (>= 1).

        Returns:
            An :class:`Allowance`, true when the message may be published; when
            false, its ``retry_after`` says how long until the next token.

        Raises:
            ValueError: ``burst`` is below 1 while ``rate`` is positive.
            PublishError: Redis could not be reached.
        """
        if rate <= 0:
            return Allowance(True)
        if burst < 1:
            raise InvalidArgument(f"a rate limit needs a burst of at least 1, not {burst!r}")
        try:
            [(allowed, wait)] = _RATE.run_many(self.client, [((key,), (repr(float(rate)), str(int(burst))))])
        except (RedisError, RedisClusterException) as exc:
            raise PublishError(f"could not check the publish rate: Redis error {type(exc).__name__}") from exc
        if int(allowed):
            return Allowance(True)
        return Allowance(False, float(_text(wait)))

    def fetch(self, requests: Sequence[tuple[str, Position | None, bool]]) -> list[ChannelState]:
        """Read the state of several channels in one round trip.

        Each request is (channel, position to read after or None, latest). With no
        position and ``latest`` false no history is read; with ``latest`` the last
        kept message is read. With a position, the history after it is returned only
        if it can recover it (see FETCH_LUA), so the cost is at most the kept history.

        Calls made while another one's read is on its way to Redis wait for it and
        are then read together, each distinct request once: 5,000 connections
        coming back at once from the same position on the broadcast channel cost
        one read of it, not 5,000. A read is never shared with a call that came
        after it was sent (that caller may have missed what was published between
        the read and its own subscription).

        Raises:
            RedisUnavailable: Redis could not be reached or refused the read.
        """
        if not requests:
            return []
        keys = [(channel, since, bool(latest)) for channel, since, latest in requests]
        now = time.monotonic()
        with self._reads_lock:
            batch = self._next_batch
            if batch is None:
                batch = self._next_batch = _ReadBatch()
            for key in keys:
                batch.keys.setdefault(key, None)
            lead = not self._reading
            if lead:
                self._reading = True
        if lead:
            if now - self._last_read < _STORM:
                # Connections are coming back in numbers (a worker restarted, Redis
                # failed over): give the others a moment to join this read.
                time.sleep(_GATHER)
            self._read_batches()
        else:
            batch.done.wait()
        if batch.error is not None:
            raise RedisUnavailable(
                f"could not read {len(keys)} channel(s): Redis error {type(batch.error).__name__}"
            ) from batch.error
        return [batch.results[key] for key in keys]

    def _read_batches(self) -> None:
        """Read the waiting batches one after another, until none is left."""
        while True:
            with self._reads_lock:
                batch = self._next_batch
                self._next_batch = None
                if batch is None:
                    self._reading = False
                    self._last_read = time.monotonic()
                    return
            try:
                keys = list(batch.keys)
                states: list[ChannelState] = []
                for start in range(0, len(keys), _READS_PER_PIPELINE):
                    states += self._read(keys[start : start + _READS_PER_PIPELINE])
                batch.results = dict(zip(keys, states, strict=True))
            except (RedisError, RedisClusterException) as exc:
                batch.error = exc
            except BaseException as exc:
                # The reader itself is being stopped: nobody is left to read the
                # batches waiting, so they fail with it.
                with self._reads_lock:
                    waiting, self._next_batch, self._reading = self._next_batch, None, False
                for failed in (batch, waiting):
                    if failed is not None:
                        failed.error = exc
                        failed.done.set()
                raise
            batch.done.set()

    def _read(self, requests: Sequence[tuple[str, Position | None, bool]]) -> list[ChannelState]:
        calls = []
        for channel, since, latest in requests:
            if since is not None and 0 <= since.offset < MAX_OFFSET:
                # Offset 0 ("from the beginning") matches any epoch; see decide_recovery.
                epoch = since.epoch if since.offset else ""
                args: tuple[Any, ...] = ("after", f"{since.offset + 1}-0", epoch)
            elif since is not None:
                # Nothing can follow the last offset Redis counts to (and a larger one
                # is no stream id): read no history, the decision says not recovered.
                args = ("none",)
            elif latest:
                args = ("latest",)
            else:
                args = ("none",)
            calls.append(((meta_key(channel), log_key(channel)), args))
        results = _FETCH.run_many(self.client, calls)
        states = []
        for epoch, top, entries in results:
            history = []
            for raw in entries:
                try:
                    history.append(decode_envelope(raw))
                except ValueError:
                    logger.warning("ignoring a malformed history entry")
            states.append(ChannelState(_text(epoch) if epoch else None, int(top or 0), tuple(history)))
        return states


class _ReadBatch:
    """History reads waiting to be sent together, and their outcome."""

    __slots__ = ("keys", "results", "error", "done")

    def __init__(self) -> None:
        self.keys: dict[tuple[str, Position | None, bool], None] = {}
        self.results: dict[tuple[str, Position | None, bool], ChannelState] = {}
        self.error: BaseException | None = None
        self.done = threading.Event()


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)
