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

With sharded pub/sub on a Redis Cluster one Hub serves one master, and a
:class:`~uwsgi_ws.shards.ShardedHub` routes channels to them; the Hub sends its
sharded (un)subscriptions one slot per command, subscribes again when a node drops a
channel whose slot moved, and reports the MOVED answer so the channel can follow.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from redis.connection import Connection
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .exceptions import RedisUnavailable, SubscribeTimeout
from .protocol import Envelope, Position, channel_label, client_frame, decide_recovery, decode_envelope

if TYPE_CHECKING:
    from .shards import ShardedHub
    from .ops import Stats
    from .store import ChannelState, Store

logger = logging.getLogger(__name__)

_CHUNK = 256  # channels per SUBSCRIBE command, and per history read after a reconnection
# Seconds after each failed pipelined history read, after a reconnection: a Redis
# Cluster promotes a replica after its node timeout (15 s by default), a Sentinel
# after down-after-milliseconds; the reads go on meanwhile, the live messages of
# those channels held, rather than closing every connection that listens to them.
_RESYNC_PAUSES = (0.2, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0)
# Messages the Hub keeps per shared channel, so that connections coming back from a
# recent position recover from memory (see Hub.recent).
_TAIL = 64

__all__ = ["Hub", "Listener", "Subscriptions", "SubscribeTimeout", "connection_factory", "make_hub", "parse_moved"]


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



class Subscriptions(Protocol):
    """What a websocket session needs of the worker's :class:`Hub` (or
    :class:`~uwsgi_ws.shards.ShardedHub`, which has the same interface)."""

    def subscribe(self, listener: Listener, channels: Iterable[str], *, timeout: float = 10.0) -> None:
        """Register ``listener`` for ``channels`` once Redis confirms them."""

    def unsubscribe(self, listener: Listener, channels: Iterable[str]) -> None:
        """Unregister ``listener`` from ``channels``."""


class _Channel:
    __slots__ = ("label", "listeners", "confirmed", "resync", "held", "position", "tail", "known", "priming")

    def __init__(self, label: str) -> None:
        self.label = label
        self.listeners: set[Listener] = set()
        self.confirmed = threading.Event()
        # After a reconnection, until the history read is done: live messages wait in
        # ``held`` (None when not resynchronising).
        self.resync = False
        self.held: list[Envelope] | None = None
        # The last position delivered on the channel, and the last messages delivered
        # up to it (kept while several listeners share the channel).
        self.position: Position | None = None
        self.tail: collections.deque[Envelope] = collections.deque(maxlen=_TAIL)
        # Before the Hub delivered anything on the channel: its state as read from
        # Redis after the subscription (position, and the messages up to it), which
        # only recent() uses; and the read of it under way.
        self.known: tuple[Position, tuple[Envelope, ...]] | None = None
        self.priming: threading.Event | None = None


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
        on_moved: with sharded pub/sub on a Cluster, called (from the reader, so it
            must not block) with the channels of a slot this node no longer owns and
            the ``(host, port)`` of the node that does, as its MOVED answer said.
        on_lost: called (from the reader, must not block) each time the connection
            breaks.
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
        on_moved: Callable[[list[str], tuple[str, int]], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        stats: Stats | None = None,
    ) -> None:
        self._connect = connect
        self._on_moved = on_moved
        self._on_lost = on_lost
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
        # UNSUBSCRIBE commands sent per channel whose answer has not arrived yet: any
        # other unsubscribe answer was pushed by the server (a Cluster slot moved).
        self._unsub_inflight: dict[str, int] = {}
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
        self._generation = 0  # connections lost so far (see _fill)
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
        new, states, send_now = self._register(listener, channels)
        if new and send_now:
            self._send(self._sub, new)
        if not _confirmed_all(states, time.monotonic() + timeout):
            self.unsubscribe(listener, channels)
            raise SubscribeTimeout()

    def _register(self, listener: Listener, channels: list[str]) -> tuple[list[str], list[_Channel], bool]:
        """Add ``listener`` to ``channels``; return the channels new to this Hub, the
        states to wait on, and whether the caller must send the SUBSCRIBE itself."""
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
        return new, states, send_now

    def unsubscribe(self, listener: Listener, channels: Iterable[str]) -> None:
        """Unregister ``listener``; channels without listeners are unsubscribed."""
        gone, send_now = self._unregister(listener, channels)
        if gone and send_now:
            self._send(self._unsub, gone)

    def _unregister(self, listener: Listener, channels: Iterable[str]) -> tuple[list[str], bool]:
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
            if send_now:
                for name in gone:
                    self._unsub_inflight[name] = self._unsub_inflight.get(name, 0) + 1
        return gone, send_now

    # ------------------------------------------------- moving channels between Hubs

    def channel_names(self) -> list[str]:
        with self._lock:
            return list(self._channels)

    def _take(self, names: Iterable[str]) -> dict[str, _Channel]:
        """Take ``names`` away from this Hub, listeners and position included, without
        unsubscribing: their node no longer serves them (see :meth:`_adopt`)."""
        taken = {}
        with self._lock:
            for name in names:
                state = self._channels.pop(name, None)
                if state is not None:
                    taken[name] = state
                self._inflight.pop(name, None)
        return taken

    def _adopt(self, states: dict[str, _Channel]) -> tuple[list[str], bool]:
        """Take over channels taken from another Hub: subscribe them here and read
        what they may have missed from history once confirmed (live messages wait
        meanwhile). Returns the channels to subscribe and whether the caller must send
        the SUBSCRIBE itself."""
        with self._lock:
            for name, state in states.items():
                assert name not in self._channels, name
                state.resync = True
                if state.held is None:
                    state.held = []
                state.confirmed.clear()
                self._channels[name] = state
                self._inflight[name] = self._inflight.get(name, 0) + 1
            return list(states), self._connected

    def recent(self, channel: str, since: Position, *, wait: float = 2.0) -> ChannelState | None:
        """What the Hub delivered on ``channel`` after ``since``, if it holds all of it.

        For a listener registered (and confirmed) on ``channel``: every message after
        the returned ``top`` reaches it live, so this answers its recovery as a read
        of Redis would. After a worker restart or a reload, thousands of connections
        come back from the same position on the broadcast channel: the first one
        that the Hub cannot answer from memory reads the missed messages from Redis
        for all of them (the others wait for that read, at most ``wait`` seconds),
        and the Hub keeps them. None when the Hub cannot tell (a position of another
        epoch, a channel resynchronising, a read that failed): read Redis then.
        """
        state = self._channels.get(channel)
        if state is None or since.offset <= 0:
            return None
        answer = self._from_memory(state, since)
        if answer is None and len(state.listeners) > 1:
            read = self._fill(channel, state, since, wait)
            answer = self._from_memory(state, since) or read
        return answer

    def _from_memory(self, state: _Channel, since: Position) -> ChannelState | None:
        from .store import ChannelState

        if state.held is not None or state.resync or not state.confirmed.is_set():
            return None
        position = state.position
        tail: tuple[Envelope, ...]
        if position is not None:
            try:
                tail = tuple(state.tail)
            except RuntimeError:  # appended to meanwhile (threads): read Redis
                return None
        elif state.known is not None:
            position, tail = state.known
        else:
            return None
        if position.epoch != since.epoch or not 0 < since.offset <= position.offset:
            return None
        if since.offset == position.offset:
            return ChannelState(position.epoch, position.offset, ())
        wanted = tuple(e for e in tail if e.offset > since.offset)
        if not _joined(wanted, since.offset + 1, position):
            return None
        return ChannelState(position.epoch, position.offset, wanted)

    def _fill(self, channel: str, state: _Channel, since: Position, wait: float) -> ChannelState | None:
        """Read what ``channel`` holds after ``since`` once for every caller of
        recent(), and keep what joins up with the messages the Hub delivered.
        Return the read to the caller that made it (None to the others).

        Only messages up to the Hub's own position are kept as delivered: those after
        it may still be on their way to the Hub, which must deliver them to the
        listeners that need them.
        """
        with self._lock:
            done = state.priming
            lead = done is None
            if lead:
                done = state.priming = threading.Event()
            generation = self._generation
        assert done is not None
        if not lead:
            done.wait(wait)
            return None
        read = None
        try:
            if self._store is not None:
                (read,) = self._store.fetch([(channel, since, False)])
        except RedisUnavailable:
            pass
        with self._lock:
            # Nothing across a reconnection: what was published while the Hub was
            # away would then look delivered.
            usable = (
                read is not None
                and read.epoch == since.epoch
                and generation == self._generation
                and state.held is None
                and (read.top == since.offset or _joined(read.history, since.offset + 1, Position(read.top, since.epoch)))
            )
            if usable:
                assert read is not None
                position = state.position
                if position is None:
                    state.known = (Position(read.top, since.epoch), read.history)
                elif position.epoch == since.epoch:
                    tail = list(state.tail)
                    first = tail[0].offset if tail else position.offset + 1
                    merged = [e for e in read.history if e.offset < first and e.offset <= position.offset] + tail
                    if _joined(merged, since.offset + 1, position):
                        # As long as the history read (HISTORY_SIZE at most): the
                        # connections still coming back from that position need it.
                        state.tail = collections.deque(merged, maxlen=max(_TAIL, len(merged)))
            state.priming = None
        done.set()
        return read

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
                for group in self._groups(channels):
                    conn.send_command(command, *group, check_health=False)
            except (RedisError, OSError) as exc:
                # The reader sees the broken connection too and reconnects.
                logger.warning("could not send %s to Redis: %s", command, exc)

    def _groups(self, channels: list[str]) -> Iterable[list[str]]:
        """Split ``channels`` into commands: on a Cluster one sharded (un)subscription
        may only name channels of one slot."""
        if self._sub == "SSUBSCRIBE":
            by_slot: dict[int, list[str]] = {}
            for name in channels:
                by_slot.setdefault(key_slot(name.encode("utf-8")), []).append(name)
            parts: Iterable[list[str]] = by_slot.values()
        else:
            parts = [channels]
        for part in parts:
            for start in range(0, len(part), _CHUNK):
                yield part[start : start + _CHUNK]

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
                if self._stopping:
                    # stop() closed the connection under a blocked read; redis-py
                    # then fails with whatever its buffer raises (ValueError on a
                    # closed file): the end asked for, not an error.
                    return
                logger.exception("unexpected error in the Hub reader; restarting it")
                self._lost()
                delay = self._max_backoff

    def _lost(self) -> None:
        with self._lock:
            self._connected = False
            self._generation += 1
            for state in self._channels.values():
                state.confirmed.clear()
                state.known = None
            self._inflight.clear()
            self._unsub_inflight.clear()
        if self._conn is not None:
            self._conn.disconnect()
        if self._on_lost is not None and not self._stopping:
            self._on_lost()

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
                self._unsub_inflight = {}
                for name in names:
                    state = self._channels[name]
                    # A channel adopted from another Hub waits for its history read
                    # even on this Hub's first connection.
                    state.resync = state.resync or resync
                    if state.resync and state.held is None:
                        state.held = []
                self._connected = True
            for group in self._groups(names):
                conn.send_command(self._sub, *group, check_health=False)
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
            except MovedError as exc:  # redis-py's parsers know the MOVED answer
                if self._sub != "SSUBSCRIBE":
                    raise
                self._moved(exc.slot_id, str(exc.host).strip("[]"), int(exc.port))
                continue
            except ResponseError as exc:  # parsers that do not
                moved = parse_moved(str(exc))
                if moved is None or self._sub != "SSUBSCRIBE":
                    raise
                self._moved(*moved)
                continue
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
            elif kind == b"sunsubscribe" and reply[1] is not None:
                self._unsubscribed(reply[1].decode("utf-8"))

    def _unsubscribed(self, name: str) -> None:
        """An unsubscription answered: ours, or pushed by a Cluster node whose slot
        moved to another node. Then subscribe again here: the node answers MOVED with
        the new owner (see :meth:`_moved`), or confirms if the slot came back; either
        way the channel reads what it missed from history once subscribed."""
        with self._lock:
            left = self._unsub_inflight.get(name, 0)
            if left:
                if left > 1:
                    self._unsub_inflight[name] = left - 1
                else:
                    del self._unsub_inflight[name]
                return
            state = self._channels.get(name)
            if state is None:
                return
            state.resync = True
            if state.held is None:
                state.held = []
            state.confirmed.clear()
            self._inflight[name] = self._inflight.get(name, 0) + 1
        logger.info("Redis dropped the subscription to %s (its slot moved); subscribing again", name)
        self._send(self._sub, [name])

    def _moved(self, slot: int, host: str, port: int) -> None:
        """A sharded subscription was refused: the slot is served by ``host:port``."""
        with self._lock:
            names = [name for name in self._channels if key_slot(name.encode("utf-8")) == slot]
            for name in names:
                self._inflight.pop(name, None)
        if self._on_moved is None:
            logger.warning(
                "Redis moved slot %d (%d channel(s)) to %s:%d; nothing follows it", slot, len(names), host, port
            )
            return
        if names:
            self._on_moved(names, (host, port))

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
        if position is not None and position.epoch != envelope.epoch:
            state.tail.clear()
        state.position = Position(envelope.offset, envelope.epoch)
        if len(state.listeners) > 1:
            state.tail.append(envelope)
        elif state.tail:
            state.tail.clear()  # it would no longer join up with the position
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
                    # A bug, here or in the Redis client: still deliver the held live
                    # messages, and tell the listeners their gap was not read.
                    logger.exception("could not resynchronise %d channel(s)", len(batch))
                    for name in batch:
                        self._release(name)
                        self._notify(name, lambda listener, n=name: listener.resync_failed(n))  # type: ignore[misc]

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
                # The gap cannot be filled: go on from where the channel stands, even
                # below what was delivered (a replica promoted before it had the last
                # messages: the next ones reuse those offsets and must not be taken
                # for repeats).
                with self._lock:
                    state.position = position
                    state.tail.clear()
            # The listeners learn where the channel stands before the live messages
            # held meanwhile, which follow that position.
            self._notify(name, lambda listener, n=name, r=recovered, p=position: listener.resynced(n, r, p))  # type: ignore[misc]
            self._release(name)

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


def parse_moved(text: str) -> tuple[int, str, int] | None:
    """The slot, host and port of a ``MOVED <slot> <host>:<port>`` error, else None."""
    parts = text.split()
    if len(parts) != 3 or parts[0] != "MOVED" or not parts[1].isdigit():
        return None
    host, _, port = parts[2].rpartition(":")
    if not host or not port.isdigit():
        return None
    return int(parts[1]), host.strip("[]"), int(port)


def _confirmed_all(states: Iterable[_Channel], deadline: float) -> bool:
    for state in states:
        if not state.confirmed.wait(max(0.0, deadline - time.monotonic())):
            return False
    return True


def _earliest(name: str, listeners: Iterable[Listener]) -> Position | None:
    """The earliest position of the listeners of ``name`` in the current epoch, if any."""
    positions = [p for p in (listener.position(name) for listener in listeners) if p is not None]
    if not positions:
        return None
    epoch = max(positions, key=lambda p: p.offset).epoch
    return min((p for p in positions if p.epoch == epoch), key=lambda p: p.offset)


def _joined(entries: Iterable[Envelope], first: int, last: Position) -> bool:
    """Whether ``entries`` are exactly the offsets ``first`` .. ``last``, in ``last``'s epoch."""
    expected = first
    for envelope in entries:
        if envelope.offset != expected or envelope.epoch != last.epoch:
            return False
        expected += 1
    return expected == last.offset + 1 and expected > first


def _subscriber_options(ping_interval: float) -> dict[str, Any]:
    return {
        "socket_timeout": ping_interval * 3,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 0,
        "client_name": f"django_ws:hub:{os.getpid()}",
    }


def connection_factory(url: str, *, ping_interval: float) -> Callable[[], Connection]:
    """Return a function making subscriber connections to the Redis at ``url``."""
    from .redis_url import subscriber_factory

    return subscriber_factory(url, **_subscriber_options(ping_interval))


def make_hub(
    url: str, *, subscribe_command: str, store: Store | None, ping_interval: float = 10.0, stats: Stats | None = None
) -> Hub | ShardedHub:
    """Return the Hub for ``url``: one subscriber connection, or with sharded pub/sub
    on a Cluster a :class:`~uwsgi_ws.shards.ShardedHub` (one per master in use)."""
    from .redis_url import is_cluster, node_factory, parse_cluster_url

    if subscribe_command == "SSUBSCRIBE" and is_cluster(url):
        from .shards import ShardedHub

        return ShardedHub(
            parse_cluster_url(url).nodes,
            node_factory(url, **_subscriber_options(ping_interval)),
            store=store,
            ping_interval=ping_interval,
            stats=stats,
        )
    return Hub(
        connection_factory(url, ping_interval=ping_interval),
        store=store,
        ping_interval=ping_interval,
        subscribe_command=subscribe_command,
        stats=stats,
    )
