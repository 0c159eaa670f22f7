"""The Hub: one Redis subscriber connection per worker process.

Every websocket of the worker registers with the Hub for its channels. The Hub
sends SUBSCRIBE when a channel gets its first local listener and UNSUBSCRIBE when it
loses its last, so the number of Redis connections does not grow with the number
of websockets. One greenlet reads replies in a tight loop: the parser hands out
every reply already buffered before touching the socket again, so nothing waits for
the next network event. No select() is involved anywhere (it fails past fd 1024).

When the connection to Redis breaks, the Hub reconnects with capped exponential
backoff, subscribes again to every channel that still has listeners, and asks each
listener to resynchronise from the channel history.

Concurrency comes from the ``threading`` module: under uWSGI's gevent loop with
monkey patching its threads, events and locks are greenlets and gevent primitives;
under the development server they are real threads. Shared state is only touched
under ``_lock``, which is never held across I/O.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from redis.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .protocol import Envelope, channel_label, client_frame, decode_envelope

logger = logging.getLogger(__name__)

_CHUNK = 256  # channels per SUBSCRIBE command when subscribing again after a reconnect


class Listener(Protocol):
    """What the Hub calls on a subscribed websocket session."""

    def deliver(self, channel: str, envelope: Envelope, frame: bytes) -> None:
        """Take one message; must not block."""

    def resync(self, channel: str) -> None:
        """Recover ``channel`` from history after the Hub lost messages; must not block."""


class SubscribeTimeout(Exception):
    """Redis did not confirm a subscription in time."""


class _Channel:
    __slots__ = ("label", "listeners", "confirmed", "resync")

    def __init__(self, label: str) -> None:
        self.label = label
        self.listeners: set[Listener] = set()
        self.confirmed = threading.Event()
        self.resync = False


class Hub:
    """Fan messages out from one Redis subscriber connection to many listeners.

    Args:
        connect: returns a new, unconnected redis-py ``Connection``.
        ping_interval: seconds between PINGs on the subscriber connection; a
            connection silent for three intervals is considered dead.
        max_backoff: the longest pause between reconnection attempts.
        subscribe_command: ``SUBSCRIBE``, or ``SSUBSCRIBE`` on a Redis Cluster.
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        *,
        ping_interval: float = 10.0,
        max_backoff: float = 5.0,
        subscribe_command: str = "SUBSCRIBE",
    ) -> None:
        self._connect = connect
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
        self._ready = threading.Event()
        self._lock = threading.Lock()  # guards _channels and _inflight
        self._write_lock = threading.Lock()  # one command at a time on the connection
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.reconnects = 0

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the reader and pinger threads (idempotent)."""
        with self._lock:
            if self._threads:
                return
            self._threads = [
                threading.Thread(target=self._read_forever, name="django_ws-hub-reader", daemon=True),
                threading.Thread(target=self._ping_forever, name="django_ws-hub-pinger", daemon=True),
            ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Ask the threads to end and close the Redis connection."""
        self._stopping = True
        if self._conn is not None:
            self._conn.disconnect()

    @property
    def channel_count(self) -> int:
        return len(self._channels)

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
        if new:
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
        if gone:
            self._send(self._unsub, gone)

    def _send(self, command: str, channels: list[str]) -> None:
        if not self._ready.is_set():
            # The reader subscribes to every registered channel once it connects.
            return
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
                self._ready.clear()
                with self._lock:
                    for state in self._channels.values():
                        state.confirmed.clear()
                    self._inflight.clear()
                if self._stopping:
                    return
                if self._conn is not None:
                    self._conn.disconnect()
                delay = min(self._max_backoff, max(0.05, delay * 2))
                if not first:
                    self.reconnects += 1
                logger.warning("Redis subscriber connection lost (%s); reconnecting in about %.2fs", exc, delay)
                first = False
            except Exception:
                logger.exception("unexpected error in the Hub reader; restarting it")
                self._ready.clear()
                if self._conn is not None:
                    self._conn.disconnect()
                delay = self._max_backoff

    def _open(self, *, resync: bool) -> None:
        conn = self._connect()
        conn.connect()
        self._conn = conn
        with self._lock:
            names = list(self._channels)
            self._inflight = {name: 1 for name in names}
            for name in names:
                self._channels[name].resync = resync
        with self._write_lock:
            for start in range(0, len(names), _CHUNK):
                conn.send_command(self._sub, *names[start : start + _CHUNK], check_health=False)
        self._ready.set()
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
                frame = client_frame(state.label, envelope)
                for listener in tuple(state.listeners):
                    listener.deliver(name, envelope, frame)
            elif kind == b"subscribe" or kind == b"ssubscribe":
                name = reply[1].decode("utf-8")
                with self._lock:
                    left = self._inflight.get(name, 0) - 1
                    if left > 0:
                        self._inflight[name] = left
                        continue
                    self._inflight.pop(name, None)
                    state = channels.get(name)
                    if state is None:
                        continue
                    listeners = tuple(state.listeners) if state.resync else ()
                    state.resync = False
                state.confirmed.set()
                for listener in listeners:
                    listener.resync(name)

    def _ping_forever(self) -> None:
        while not self._stopping:
            time.sleep(self._ping_interval)
            conn = self._conn
            if not self._ready.is_set() or conn is None:
                continue
            with self._write_lock:
                try:
                    conn.send_command("PING", check_health=False)
                except (RedisError, OSError) as exc:
                    logger.warning("could not PING Redis: %s", exc)


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
