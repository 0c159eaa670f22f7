"""One connection's driver: moves bytes, runs reads and publishes, keeps the time.

Everything a connection decides is decided by its core (:mod:`uwsgi_ws.core`); a
:class:`Session` only feeds it events (the Hub's messages, the client's bytes, the
clock, the outcome of a history read or a publish) and carries out the actions it
returns. The same driver serves the gevent transport of the websocket instance and
the threaded transport of the development server; :class:`EventStreamSession`
serves Server-Sent Events with the same driver and another core.

Close codes used (besides the standard ones wsproto picks for protocol errors):

    1000  normal closure
    1008  policy violation: too many refused client messages (no right to
          publish, or over the rate limit)
    1009  message too big: larger than MAX_MESSAGE_SIZE
    1011  internal error
    1012  service restart: the worker is reloading; reconnect and recover
    1013  try again later: Redis did not confirm the subscriptions in time, or could
          not be read
    4008  slow consumer: the send queue exceeded its bounds; reconnect and recover
    4009  heartbeat timeout: the client answered nothing for three intervals
    4010  connection too old (MAX_CONNECTION_AGE): reconnect, with fresh rights
    4000-4999 otherwise: closed on order of Django (``disconnect()``); 4100-4199 ask
          the client not to reconnect
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .core import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_SERVICE_RESTART,
    Action,
    EventStreamCore,
    Finish,
    Publish,
    ReadHistory,
    Send,
    SessionCore,
)
from .exceptions import PublishError, RedisUnavailable
from .hub import Subscriptions
from .protocol import Envelope, Position, Ticket, rate_key
from .store import ChannelState, Store
from .transport import Transport

if TYPE_CHECKING:
    from .control import Controller
    from .presence import PresenceTracker
    from .ops import Stats

logger = logging.getLogger(__name__)

# Seconds a closing connection may take to write what is queued (its close frame).
DRAIN_TIMEOUT = 2.0
# Seconds a closed connection keeps reading (and dropping) what the client still sends.
LINGER_TIMEOUT = 1.0
# Client frames read per second from one connection, and the burst allowed above that
# pace (ten frames per allowed message when RATE_LIMIT allows more than 100 a second).
# No client needs more (publishes are limited to 10 a second by default, pings come
# every few seconds), and a client sending faster waits: TCP slows it down. Yielding
# between batches alone is not enough: ten clients flooding tiny frames kept a worker
# busy and the others' broadcast p99 went from 7 to 57 ms (bench/hostile.py); at ~12 µs
# a frame, ten clients at this pace take an eighth of a worker.
FRAME_RATE = 1000


class Session:
    """Serve one websocket until it closes.

    Args:
        ticket: what the connection may do, as signed by Django.
        transport: the byte transport of the connection.
        hub: the worker's Hub (or ShardedHub).
        store: Redis access for publishing and history.
        subscribe_timeout: seconds to wait for Redis to confirm subscriptions.
        controller: the worker's controller, which closes connections on Django's
            orders (``disconnect()``); None: no orders are followed.
        presence: the worker's presence tracker, which lists the connection in the
            channels of ``ticket.presence``; None: it is listed nowhere.
        stats: the worker's figures, counted here; None: nothing is counted.
        clock: monotonic clock (for tests).
    """

    core_class: type[SessionCore] = SessionCore

    def __init__(
        self,
        ticket: Ticket,
        transport: Transport,
        hub: Subscriptions,
        store: Store,
        *,
        subscribe_timeout: float = 10.0,
        controller: Controller | None = None,
        presence: PresenceTracker | None = None,
        stats: Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ticket = ticket
        self._stats = stats
        self.transport = transport
        self.hub = hub
        self.store = store
        self.controller = controller
        self.presence = presence
        self.tags = ticket.tags
        self.started = time.time()
        self.id = os.urandom(8).hex().encode("ascii")
        self.core = self.core_class(ticket, sender=self.id, now=clock())
        self._subscribe_timeout = subscribe_timeout
        self._clock = clock
        self._finish: Finish | None = None
        limits = ticket.limits
        self._queue_bytes = limits.queue_bytes
        self._queue_messages = limits.queue_messages
        # Stop reading while more than this waits to be written: a client that does
        # not read cannot make the server produce more (pongs, errors) for it.
        self._read_pause = max(1024, limits.queue_bytes // 4)
        # The same in chunks: tiny frames (pongs are 2 bytes) reach the message bound
        # long before the byte mark, and a client that reads would be cut off as a slow
        # consumer for a burst of pings.
        self._read_pause_messages = max(1, limits.queue_messages // 4)
        # The frame pace (FRAME_RATE): a token bucket, spent after each batch.
        self._frame_rate = max(float(FRAME_RATE), 10.0 * limits.rate)
        self._frame_burst = max(float(FRAME_RATE), 10.0 * limits.burst)
        self._frame_tokens = self._frame_burst
        self._frame_stamp = clock()
        self._frames_counted = 0
        # Live deliveries (Hub thread) and the session's own thread both feed the core
        # and write to the transport: one at a time, in order. Under gevent nothing
        # between two sends can switch greenlets: no lock needed.
        self._cooperative = getattr(transport, "cooperative", False)
        self._lock: contextlib.AbstractContextManager[object] = (
            contextlib.nullcontext() if self._cooperative else threading.RLock()
        )
        # The channels this connection is listed in (presence), and those ended on
        # order whose Hub subscription and presence entry the session's thread removes.
        self._listed: list[str] = []
        self._ended: list[str] = []

    # ----------------------------------------------------------------- main loop

    def run(self) -> None:
        """Serve the connection until either side closes it."""
        channels = [*self.core.labels, *self.core.event_channels]
        controlled = False
        ticket = self.ticket
        try:
            try:
                if self.controller is not None:
                    self.controller.add(self, timeout=self._subscribe_timeout)
                    controlled = True
                if channels:
                    self.hub.subscribe(self, channels, timeout=self._subscribe_timeout)
                if self.presence is not None and ticket.presence:
                    # Listed before the client is ready: a roster it reads then has it.
                    self.presence.join(
                        self.id.decode("ascii"),
                        ticket.presence,
                        user=ticket.presence_user,
                        info=ticket.presence_info,
                        ttl=ticket.presence_ttl,
                        stream_size=ticket.presence_stream,
                        since=self.started,
                    )
                    self._listed = list(ticket.presence)
            except RedisUnavailable as exc:  # SubscribeTimeout among them
                logger.warning("closing the connection of %s: Redis unavailable (%s)", self.ticket.identity, exc)
                self._perform(self._step(self.core.failed))
                return
            self._perform(self._step(self.core.subscribed))
            self._loop()
        except Exception:
            logger.exception("websocket session of %s failed", self.ticket.identity)
            self._step(self.core.close, CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            self._release_ended()
            if self._listed:
                assert self.presence is not None
                self.presence.leave(
                    self.id.decode("ascii"), self._listed, user=ticket.presence_user, stream_size=ticket.presence_stream
                )
            if controlled:
                assert self.controller is not None
                self.controller.remove(self)
            if channels:
                self.hub.unsubscribe(self, channels)
            if self._finish is not None:
                if self.transport.drain(DRAIN_TIMEOUT):
                    self.transport.linger(LINGER_TIMEOUT)
            self.core.closed()
            self.transport.close()
            if self._stats is not None:
                self._stats.close(self.core.close_code)
                self._count_recoveries()

    def _loop(self) -> None:
        transport = self.transport
        core = self.core
        pending = False  # frames received and not handled yet
        while not transport.closed and self._finish is None:
            now = self._clock()
            wait = max(0.0, core.next_timer - now)
            if transport.queued_bytes > self._read_pause or transport.queued_messages > self._read_pause_messages:
                # Let the client read first, frames already received included: a burst
                # of pings read in one go must not queue more pongs than the bounds
                # while the writer lags. The timers still run.
                transport.drain(min(wait, 1.0))
            elif pending:
                pending = self._handle_batch(now)
            else:
                data = transport.recv(wait)
                if data == b"":
                    break
                if data:
                    core.receive(data, self._clock())
                    pending = True
            now = self._clock()
            if self._ended:  # subscriptions ended on order (see unsubscribe_soon)
                self._release_ended()
            if now >= core.next_timer and self._finish is None:
                self._perform(self._step(core.timer, now))

    def _handle_batch(self, now: float) -> bool:
        """Handle one batch of received frames; return whether more wait."""
        blocking, more = self._process(now)
        self._perform(blocking)
        delay = self._frame_debt()
        if more or delay:
            # A flood must not delay the worker's other sockets, nor read faster
            # than FRAME_RATE.
            self.transport.cooperate(delay)
        return more

    def _frame_debt(self) -> float:
        """Spend the frames handled since the last call; return the seconds to wait
        for the frame pace (at most one batch's worth: 64 ms at FRAME_RATE)."""
        now = self._clock()
        handled = self.core.events_handled
        tokens = min(self._frame_burst, self._frame_tokens + (now - self._frame_stamp) * self._frame_rate)
        self._frame_tokens = tokens - (handled - self._frames_counted)
        self._frames_counted = handled
        self._frame_stamp = now
        return -self._frame_tokens / self._frame_rate if self._frame_tokens < 0 else 0.0

    def _process(self, now: float) -> tuple[list[Action], bool]:
        with self._lock:
            actions, more = self.core.process(now)
            return self._apply(actions), more

    # ----------------------------------------------------------------- actions

    def _step(self, event: Callable[..., list[Action]], *args: object) -> list[Action]:
        """Feed the core one event; carry out its sends at once, return the rest."""
        with self._lock:
            return self._apply(event(*args))

    def _apply(self, actions: list[Action]) -> list[Action]:
        """Write and finish now (under the lock); return the actions that block."""
        later: list[Action] = []
        for action in actions:
            if isinstance(action, Send):
                self._send(action.data)
            elif isinstance(action, Finish):
                self._finished(action)
            else:
                later.append(action)
        return later

    def _count_recoveries(self) -> None:
        stats, core = self._stats, self.core
        if stats is not None and (core.recovered or core.not_recovered):
            stats.recovered += core.recovered
            stats.not_recovered += core.not_recovered
            core.recovered = core.not_recovered = 0

    def _send(self, data: bytes) -> None:
        transport = self.transport
        transport.send(data)
        stats = self._stats
        if stats is not None:
            stats.bytes_sent += len(data)
        # Every frame counts, whatever it is: a flood of pongs or errors for a client
        # that never reads is a slow consumer like any other.
        if transport.queued_bytes > self._queue_bytes or transport.queued_messages > self._queue_messages:
            if self._finish is None:
                if stats is not None:
                    stats.slow_consumers += 1
                logger.warning(
                    "closing slow consumer %s: %d bytes in %d chunks waiting",
                    self.ticket.identity,
                    transport.queued_bytes,
                    transport.queued_messages,
                )
            self._apply(self.core.overflow())

    def _finished(self, action: Finish) -> None:
        if self._finish is not None:
            return
        self._finish = action
        if action.discard:
            self.transport.discard_queued()
        self.transport.interrupt()  # the loop ends, then drains briefly

    def _perform(self, actions: list[Action]) -> None:
        """Carry out the actions that block (reads, publishes), in the session's thread."""
        while actions:
            action = actions.pop(0)
            if isinstance(action, ReadHistory):
                try:
                    states = self._read_history(action.requests)
                except RedisUnavailable as exc:
                    logger.warning("closing the connection of %s: %s", self.ticket.identity, exc)
                    actions += self._step(self.core.failed)
                    continue
                actions += self._step(self.core.history_read, states)
                self._count_recoveries()
            elif isinstance(action, Publish):
                refusal = self._publish(action)
                actions += self._step(self.core.published, refusal, self._clock())

    def _read_history(self, requests: tuple[tuple[str, Position | None, bool], ...]) -> list[ChannelState]:
        """Each channel's state after the given positions: from the Hub where it
        holds what was missed (see :meth:`Hub.recent`), else from Redis, in one read.

        Raises:
            RedisUnavailable: Redis could not be reached.
        """
        states: list[ChannelState | None] = [
            None if since is None else self.hub.recent(channel, since) for channel, since, _ in requests
        ]
        missing = [i for i, state in enumerate(states) if state is None]
        if missing:
            for i, state in zip(missing, self.store.fetch([requests[i] for i in missing]), strict=True):
                states[i] = state
        return states  # type: ignore[return-value]

    def _publish(self, action: Publish) -> str | None:
        limits = self.ticket.limits
        stats = self._stats
        if stats is not None:
            stats.received += 1
        try:
            # The core's own limiter stopped this connection's floods; this bucket is
            # the client's, shared with its other connections and its POSTs.
            key = rate_key(self.ticket.prefix, self.ticket.identity)
            if not self.store.allow(key, rate=limits.rate, burst=limits.burst):
                return "rate_limited"
            self.store.publish(
                self.ticket.publish,
                action.kind,
                action.payload,
                sender=self.id,
                history_size=limits.history_size,
                history_ttl=limits.history_ttl,
                history_max_bytes=limits.history_max_bytes,
            )
        except PublishError as exc:
            logger.error("publish from %s failed: %s", self.ticket.identity, exc)
            if stats is not None:
                stats.publish_errors += 1
            return "unavailable"
        if stats is not None:
            stats.published += 1
        return None

    # ----------------------------------------------------------------- from other threads

    def deliver(self, channel: str, envelope: Envelope, frame: bytes) -> None:
        """Take one live message from the Hub (never blocks)."""
        if self._cooperative:  # the broadcast path: no context manager per listener
            data = self.core.live(channel, envelope, frame)
            if data is not None:
                self._send(data)
                if self._stats is not None:
                    self._stats.delivered += 1
        else:
            with self._lock:
                data = self.core.live(channel, envelope, frame)
                if data is not None:
                    self._send(data)
                    if self._stats is not None:
                        self._stats.delivered += 1

    def resynced(self, channel: str, recovered: bool, position: Position) -> None:
        """The Hub caught up with ``channel`` after a reconnection (never blocks)."""
        self._step(self.core.resynced, channel, recovered, position)
        self._count_recoveries()

    def resync_failed(self, channel: str) -> None:
        """The Hub could not read ``channel``'s history after a reconnection."""
        logger.warning("closing the connection of %s: its history could not be read", self.ticket.identity)
        self.close_soon(1013, "try again later")

    def position(self, channel: str) -> Position | None:
        with self._lock:
            return self.core.position(channel)

    def close_soon(self, code: int, reason: str) -> None:
        """Close with ``code`` from another greenlet or thread (never blocks)."""
        self._step(self.core.close, code, reason)

    def unsubscribe_soon(self, audience: str, facility: str | None) -> bool:
        """End the subscriptions to ``audience`` (in ``facility``, or any) from another
        greenlet or thread (never blocks): nothing more is delivered on them at once;
        the session's own thread then leaves the Hub's channel and the presence."""
        from .protocol import parse_channel

        with self._lock:
            channels = []
            for channel, label in self.core.labels.items():
                if label == audience and (facility is None or parse_channel(channel)[1] == facility):
                    channels.append(channel)
            if not channels:
                return False
            self._apply(self.core.unsubscribe(channels))
            self._ended += channels
        self.transport.interrupt()
        return True

    def _release_ended(self) -> None:
        """Leave the Hub's channels and the presence of subscriptions ended on order."""
        with self._lock:
            ended, self._ended = self._ended, []
        if not ended:
            return
        from .protocol import presence_channel

        self.hub.unsubscribe(self, [*ended, *(presence_channel(c) for c in ended)])
        gone = [c for c in ended if c in self._listed]
        if gone and self.presence is not None:
            self._listed = [c for c in self._listed if c not in gone]
            self.presence.leave(
                self.id.decode("ascii"), gone, user=self.ticket.presence_user, stream_size=self.ticket.presence_stream
            )

    def going_away(self) -> None:
        """Close with 1012 (service restart) from another greenlet or thread."""
        self.close_soon(CLOSE_SERVICE_RESTART, "service restart")


class EventStreamSession(Session):
    """Serve a Server-Sent Events stream: the same subscriptions, history and
    recovery as a websocket, one way (see :class:`uwsgi_ws.core.EventStreamCore`)."""

    core_class = EventStreamCore
