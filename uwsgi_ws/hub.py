"""The Hub: one Redis subscriber connection per worker process.

Every websocket of the worker registers with the Hub for its channels. The Hub
sends SUBSCRIBE when a channel gets its first local listener and UNSUBSCRIBE when it
loses its last, so the number of Redis connections does not grow with the number
of websockets. One thread (a greenlet under gevent) reads replies in a tight loop:
the parser hands out every reply already buffered before touching the socket
again, so nothing waits for the next network event. No select() is involved
anywhere (it fails past fd 1024).

When the connection to Redis breaks, the Hub reconnects with capped exponential
backoff and subscribes again to every channel that still has listeners. Whatever
was published meanwhile is then read back from each channel's history ONCE for
the whole worker (one pipelined read for up to ``_CHUNK`` channels), not once per
socket: the Hub remembers the last position it delivered on each channel, holds the
channel's new live messages while the read runs, delivers the missed ones and then
the held ones, in order and without duplicates, and tells each listener whether the
gap could be covered (``resynced``). 5,000 sockets on one broadcast channel cost
one read.

Concurrency comes from the ``threading`` module: under uWSGI's gevent loop with
monkey patching its threads, events and locks are greenlets and gevent primitives;
under the development server they are real threads. Shared state is only touched
under ``_lock``, which is never held across I/O. The decision "send a SUBSCRIBE now
or leave it to the reader" is taken under ``_lock``, in step with the reader's
snapshot of the channels after a reconnection, so no subscription falls between
the two.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from redis.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .exceptions import RedisUnavailable, SubscribeTimeout
from .protocol import Envelope, Position, channel_label, client_frame, decide_recovery, decode_envelope

if TYPE_CHECKING:
    from .ops import Stats
    from .store import ChannelState, Store

logger = logging.getLogger(__name__)

_CHUNK = 256  # channels per SUBSCRIBE command, and per history read after a reconnection
_RESYNC_PAUSES = (0.2, 0.5, 1.0)  # seconds after each failed pipelined history read

__all__ = ["Hub", "Listener", "SubscribeTimeout", "connection_factory"]


class Listener(Protocol):
    """What the Hub calls on a subscribed websocket session. None of it may block."""

    def deliver(self, channel: str, envelope: Envelope, frame: bytes) -> None:
        """Take one message."""

    def resynced(self, channel: str, recovered: bool, position: Position) -> None:
        """After a reconnection: the missed messages of ``channel`` were delivered
        (``recovered``), or could not all be found; the channel now stands at ``position``."""

    def resync_failed(self, channel: str) -> None:
        """After a reconnection, the history of ``channel`` could not be read."""

    def position(self, channel: str) -> Position | None:
        """Where the listener stands in ``channel`` (None: still reading it)."""



class _Channel:
    __slots__ = ("label", "listeners", "confirmed", "resync", "held", "position")

    def __init__(self, label: str) -> None:
        self.label = label
        self.listeners: set[Listener] = set()
        self.confirmed = threading.Event()
        # After a reconnection, until the history read is done: live messages wait in
        # ``held`` (None when not resynchronising).
        self.resync = False
        self.held: list[Envelope] | None = None
        # The last position delivered on the channel.
        self.position: Position | None = None


class Hub:
    """Fan messages out from one Redis subscriber connection to many listeners.

    Args:
        connect: returns a new, unconnected redis-py ``Connection``.
        store: reads channel history after a reconnection (None: the gap is
            reported as not recovered).
        ping_interval: seconds between PINGs on the subscriber connection; a
            connection silent for three intervals is considered dead.
        max_backoff: the longest pause between reconnection attempts.
        subscribe_command: ``SUBSCRIBE``, or ``SSUBSCRIBE`` for sharded pub/sub.
        stats: the worker's figures (the delivery lag is recorded here); None: none.
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        *,
        store: Store | None = None,
        ping_interval: float = 10.0,
        max_backoff: float = 5.0,
        subscribe_command: str = "SUBSCRIBE",
        stats: Stats | None = None,
    ) -> None:
        self._connect = connect
        self._stats = stats
        self._store = store
        self._ping_interval = ping_interval
        self._max_backoff = max_backoff
        self._sub = subscribe_command
        self._unsub = "SUNSUBSCRIBE" if subscribe_command == "SSUBSCRIBE" else "UNSUBSCRIBE"
        self._channels: dict[str, _Channel] = {}
        # SUBSCRIBE commands sent per channel whose confirmation has not arrived yet.
        # A channel is confirmed only when this drops to zero: after a quick
        # SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE the first confirmation must not count.
        self._inflight: dict[str, int] = {}
        self._conn: Connection | None = None
        # True from the reader's snapshot of the channels (under _lock) until the
        # connection breaks: subscribe() then sends its own SUBSCRIBE.
        self._connected = False
        self._lock = threading.Lock()  # guards the state above
        self._write_lock = threading.Lock()  # one command at a time on the connection
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._stopped = threading.Event()  # wakes the pinger up when the Hub stops
        # Channels confirmed after a reconnection, waiting for their history read.
        self._to_resync: collections.deque[str] = collections.deque()
        self._resync_wanted = threading.Event()
        self.reconnects = 0
        #: Errors on the subscriber connection (each one ends it; the Hub reconnects).
        self.errors = 0
        #: History reads issued after reconnections (one per pipelined batch of channels).
        self.resync_reads = 0
        #: Exceptions raised by listeners (each logged, none stops the Hub).
        self.listener_errors = 0

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the reader, pinger and resync threads (idempotent)."""
        with self._lock:
            if self._threads:
                return
            self._threads = [
                threading.Thread(target=self._read_forever, name="django_ws-hub-reader", daemon=True),
                threading.Thread(target=self._ping_forever, name="django_ws-hub-pinger", daemon=True),
                threading.Thread(target=self._resync_forever, name="django_ws-hub-resync", daemon=True),
            ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Ask the threads to end and close the Redis connection."""
        self._stopping = True
        self._resync_wanted.set()
        self._stopped.set()
        if self._conn is not None:
            self._conn.disconnect()

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def connected(self) -> bool:
        """The subscriber connection is up (every channel was subscribed again on it)."""
        return self._connected and not self._stopping

    def subscriptions(self) -> int:
        """The listeners of every channel, summed."""
        return sum(len(state.listeners) for state in tuple(self._channels.values()))

    def busiest(self, count: int) -> list[tuple[str, int]]:
        """The ``count`` channels with the most local listeners: (name, listeners)."""
        sizes = [(name, len(state.listeners)) for name, state in tuple(self._channels.items())]
        sizes.sort(key=lambda item: (-item[1], item[0]))
        return sizes[:count]

    # ----------------------------------------------------------------- listeners

    def subscribe(self, listener: Listener, channels: Iterable[str], *, timeout: float = 10.0) -> None:
        """Register ``listener`` for ``channels`` and wait until Redis confirms them.

        Raises:
            SubscribeTimeout: Redis did not confirm within ``timeout`` seconds; the
                listener is then unregistered again.
        """
        self.start()
        channels = list(dict.fromkeys(channels))
        new = []
        with self._lock:
            states = []
            for name in channels:
                state = self._channels.get(name)
                if state is None:
                    state = self._channels[name] = _Channel(channel_label(name))
                    new.append(name)
                    self._inflight[name] = self._inflight.get(name, 0) + 1
                state.listeners.add(listener)
                states.append(state)
            # Decided with the reader's snapshot excluded: either the reader has not
            # taken it yet (and will subscribe these channels) or it has, and we must.
            send_now = self._connected
        if new and send_now:
            self._send(self._sub, new)
        deadline = time.monotonic() + timeout
        for state in states:
            if not state.confirmed.wait(max(0.0, deadline - time.monotonic())):
                self.unsubscribe(listener, channels)
                raise SubscribeTimeout()

    def unsubscribe(self, listener: Listener, channels: Iterable[str]) -> None:
        """Unregister ``listener``; channels without listeners are unsubscribed."""
        gone = []
        with self._lock:
            for name in channels:
                state = self._channels.get(name)
                if state is None:
                    continue
                state.listeners.discard(listener)
                if not state.listeners:
                    del self._channels[name]
                    gone.append(name)
            send_now = self._connected
        if gone and send_now:
            self._send(self._unsub, gone)

    def position(self, channel: str) -> Position | None:
        """The last position the Hub knows of ``channel`` (for tests and metrics)."""
        state = self._channels.get(channel)
        return None if state is None else state.position

    def _send(self, command: str, channels: list[str]) -> None:
        conn = self._conn
        if conn is None:
            return
        with self._write_lock:
            try:
                for start in range(0, len(channels), _CHUNK):
                    conn.send_command(command, *channels[start : start + _CHUNK], check_health=False)
            except (RedisError, OSError) as exc:
                # The reader sees the broken connection too and reconnects.
                logger.warning("could not send %s to Redis: %s", command, exc)

    # ----------------------------------------------------------------- reader

    def _read_forever(self) -> None:
        delay = 0.0
        first = True
        while not self._stopping:
            if delay:
                time.sleep(delay * (0.5 + random.random() / 2))
            try:
                self._open(resync=not first)
                delay = 0.0
                first = False
                self._read()
            except (RedisError, OSError) as exc:
                self._lost()
                if self._stopping:
                    return
                self.errors += 1
                delay = min(self._max_backoff, max(0.05, delay * 2))
                if not first:
                    self.reconnects += 1
                logger.warning("Redis subscriber connection lost (%s); reconnecting in about %.2fs", exc, delay)
                first = False
            except Exception:
                logger.exception("unexpected error in the Hub reader; restarting it")
                self._lost()
                delay = self._max_backoff

    def _lost(self) -> None:
        with self._lock:
            self._connected = False
            for state in self._channels.values():
                state.confirmed.clear()
            self._inflight.clear()
        if self._conn is not None:
            self._conn.disconnect()

    def _open(self, *, resync: bool) -> None:
        conn = self._connect()
        conn.connect()
        # Hold the write lock from the snapshot to the last SUBSCRIBE: a subscribe()
        # or unsubscribe() that comes after the snapshot sends its command after these.
        with self._write_lock:
            with self._lock:
                self._conn = conn
                names = list(self._channels)
                self._inflight = {name: 1 for name in names}
                for name in names:
                    state = self._channels[name]
                    state.resync = resync
                    if resync and state.held is None:
                        state.held = []
                self._connected = True
            for start in range(0, len(names), _CHUNK):
                conn.send_command(self._sub, *names[start : start + _CHUNK], check_health=False)
        if resync:
            logger.info("Redis subscriber connection restored; %d channel(s) subscribed again", len(names))

    def _read(self) -> None:
        conn = self._conn
        assert conn is not None
        channels = self._channels
        while True:
            try:
                reply = conn.read_response()
            except RedisTimeoutError:
                raise RedisConnectionError("no answer to PING from Redis") from None
            if not isinstance(reply, list):
                continue  # +PONG outside of subscribe mode
            kind = reply[0]
            if kind == b"message" or kind == b"smessage":
                name = reply[1].decode("utf-8")
                state = channels.get(name)
                if state is None or not state.listeners:
                    continue
                try:
                    envelope = decode_envelope(reply[2])
                except ValueError:
                    logger.warning("ignoring a malformed message on %s", name)
                    continue
                if state.held is not None and self._hold(state, envelope):
                    continue  # delivered after the history being read
                self._fan_out(name, state, envelope)
            elif kind == b"subscribe" or kind == b"ssubscribe":
                self._confirmed(reply[1].decode("utf-8"))

    def _confirmed(self, name: str) -> None:
        with self._lock:
            left = self._inflight.get(name, 0) - 1
            if left > 0:
                self._inflight[name] = left
                return
            self._inflight.pop(name, None)
            state = self._channels.get(name)
            if state is None:
                return
            resync = state.resync
            state.resync = False
        state.confirmed.set()
        if resync:
            self._to_resync.append(name)
            self._resync_wanted.set()

    def _hold(self, state: _Channel, envelope: Envelope) -> bool:
        with self._lock:  # the resync thread releases the held messages under it
            if state.held is None:
                return False
            state.held.append(envelope)
            return True

    def _fan_out(self, name: str, state: _Channel, envelope: Envelope) -> None:
        position = state.position
        if position is not None and position.epoch == envelope.epoch and envelope.offset <= position.offset:
            return  # delivered already (replayed from history after a reconnection)
        state.position = Position(envelope.offset, envelope.epoch)
        frame = client_frame(state.label, envelope)
        listeners = tuple(state.listeners)
        for listener in listeners:
            try:
                listener.deliver(name, envelope, frame)
            except Exception:
                # One broken listener must not cost the worker its subscriber connection.
                self.listener_errors += 1
                logger.exception("a listener of %s failed to take a message", name)
        stats = self._stats
        if stats is not None and envelope.published:
            # Once per message, not per listener: the time after the last write is
            # what every listener of this worker waited, at most.
            stats.observe_lag(time.time() - envelope.published, len(listeners))

    def _notify(self, name: str, call: Callable[[Listener], None]) -> None:
        state = self._channels.get(name)
        if state is None:
            return
        for listener in tuple(state.listeners):
            try:
                call(listener)
            except Exception:
                self.listener_errors += 1
                logger.exception("a listener of %s failed", name)

    # ----------------------------------------------------------------- resync

    def _resync_forever(self) -> None:
        while not self._stopping:
            self._resync_wanted.wait()
            self._resync_wanted.clear()
            while self._to_resync and not self._stopping:
                batch: list[str] = []
                while self._to_resync and len(batch) < _CHUNK:
                    batch.append(self._to_resync.popleft())
                try:
                    self._resync(batch)
                except Exception:
                    logger.exception("could not resynchronise %d channel(s)", len(batch))

    def _resync(self, names: list[str]) -> None:
        """Read the missed history of ``names`` once, then deliver and release them."""
        with self._lock:
            found = []
            for name in dict.fromkeys(names):
                state = self._channels.get(name)
                if state is not None and state.held is not None:
                    found.append((name, state.position, tuple(state.listeners)))
        # No message arrived on the channel since it was subscribed: resume from the
        # earliest position among its listeners (those still reading it themselves
        # have none: their own read covers the gap).
        wanted: list[tuple[str, Position | None]] = [
            (name, since or _earliest(name, listeners)) for name, since, listeners in found
        ]
        to_read = [(name, since) for name, since in wanted if since is not None]
        states: dict[str, ChannelState | None] = {}
        if to_read and self._store is not None:
            states = self._read_history(to_read)
        for name, since in wanted:
            state = self._channels.get(name)
            if state is None:
                continue
            if since is None:
                self._release(name)
                continue
            if name in states and states[name] is None:  # its node is unreachable
                self._release(name)
                self._notify(name, lambda listener, n=name: listener.resync_failed(n))  # type: ignore[misc]
                continue
            read = states.get(name)
            missed: tuple[Envelope, ...] = ()  # no store: nothing can be read back
            recovered, position = False, since
            if read is not None:
                outcome = decide_recovery(since, read.epoch, read.top, read.history)
                recovered, position, missed = bool(outcome.recovered), outcome.position, outcome.envelopes
            for envelope in missed:
                self._fan_out(name, state, envelope)
            if not recovered:
                with self._lock:  # the gap cannot be filled: go on from where the channel is
                    state.position = _later(state.position, position)
            self._release(name)
            self._notify(name, lambda listener, n=name, r=recovered, p=position: listener.resynced(n, r, p))  # type: ignore[misc]

    def _read_history(self, to_read: list[tuple[str, Position]]) -> dict[str, ChannelState | None]:
        """Read every channel of ``to_read``: one pipelined read, tried a few times
        (right after a failover the new primary may need a moment). If it keeps
        failing, each channel is read on its own, so that on a Cluster with one
        master down only that master's channels fail (None)."""
        assert self._store is not None
        requests = [(name, since, False) for name, since in to_read]
        for pause in _RESYNC_PAUSES:
            self.resync_reads += 1
            try:
                return dict(zip((n for n, _ in to_read), self._store.fetch(requests), strict=True))
            except RedisUnavailable as exc:
                failure = exc
            if self._stopping:
                break
            time.sleep(pause)
        states: dict[str, ChannelState | None] = {}
        for request in requests:
            self.resync_reads += 1
            try:
                (states[request[0]],) = self._store.fetch([request])
            except RedisUnavailable:
                states[request[0]] = None
        failed = sum(1 for state in states.values() if state is None)
        if failed:
            logger.warning(
                "could not read the history of %d channel(s) after reconnecting: %s", failed, failure
            )
        return states

    def _release(self, name: str) -> None:
        """Deliver the live messages held during a channel's history read, and stop holding."""
        state = self._channels.get(name)
        if state is None:
            return
        while True:
            # Taken in turns: the reader may append while these are delivered.
            with self._lock:
                held = state.held
                if not held:
                    state.held = None
                    return
                envelope = held.pop(0)
            self._fan_out(name, state, envelope)

    # ----------------------------------------------------------------- pinger

    def _ping_forever(self) -> None:
        while not self._stopping:
            if self._stopped.wait(self._ping_interval):
                return
            conn = self._conn
            if not self._connected or conn is None:
                continue
            with self._write_lock:
                try:
                    conn.send_command("PING", check_health=False)
                except (RedisError, OSError) as exc:
                    logger.warning("could not PING Redis: %s", exc)


def _earliest(name: str, listeners: Iterable[Listener]) -> Position | None:
    """The earliest position of the listeners of ``name`` in the current epoch, if any."""
    positions = [p for p in (listener.position(name) for listener in listeners) if p is not None]
    if not positions:
        return None
    epoch = max(positions, key=lambda p: p.offset).epoch
    return min((p for p in positions if p.epoch == epoch), key=lambda p: p.offset)


def _later(current: Position | None, other: Position) -> Position:
    if current is not None and current.epoch == other.epoch and current.offset > other.offset:
        return current
    return other


def connection_factory(url: str, *, ping_interval: float) -> Callable[[], Connection]:
    """Return a function making subscriber connections to the Redis at ``url``."""
    from .redis_url import subscriber_factory

    return subscriber_factory(
        url,
        socket_timeout=ping_interval * 3,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=0,
        client_name=f"django_ws:hub:{os.getpid()}",
    )
