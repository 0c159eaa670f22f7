"""One websocket connection: framing, subscriptions, recovery, client publishes.

The session reads client frames with wsproto (a sans-I/O websocket library: UTF-8
validation, fragmentation, close handshake) and writes server frames itself, since
a delivered message is framed once by the Hub and the same bytes go to every
subscriber.

Close codes used (besides the standard ones wsproto picks for protocol errors):

    1000  normal closure
    1009  message too big: larger than MAX_MESSAGE_SIZE
    1011  internal error
    1012  service restart: the worker is reloading; reconnect and recover
    1013  try again later: Redis did not confirm the subscriptions in time
    4008  slow consumer: the send queue exceeded its bounds; reconnect and recover
    4009  heartbeat timeout: the client answered nothing for three intervals
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

from .exceptions import PublishError
from .hub import Hub, SubscribeTimeout
from .protocol import (
    KIND_BINARY,
    KIND_TEXT,
    SSE_HEARTBEAT,
    Envelope,
    Position,
    RateLimiter,
    Ticket,
    client_frame,
    decide_recovery,
    encode_event_id,
    sse_event,
    sse_message_data,
    text_frame,
)
from .store import ChannelState, Store
from .transport import Transport

logger = logging.getLogger(__name__)

CLOSE_SERVICE_RESTART = 1012
CLOSE_SLOW_CONSUMER = 4008
CLOSE_HEARTBEAT_TIMEOUT = 4009
HEARTBEAT_FRAME = text_frame({"type": "heartbeat"})


class Session:
    """Serve one websocket until it closes.

    Args:
        ticket: what the connection may do, as signed by Django.
        transport: the byte transport of the connection.
        hub: the worker's Hub.
        store: Redis access for publishing and history.
        subscribe_timeout: seconds to wait for Redis to confirm subscriptions.
        clock: monotonic clock (for tests).
    """

    def __init__(
        self,
        ticket: Ticket,
        transport: Transport,
        hub: Hub,
        store: Store,
        *,
        subscribe_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ticket = ticket
        self.transport = transport
        self.hub = hub
        self.store = store
        self.id = os.urandom(8).hex().encode("ascii")
        self._subscribe_timeout = subscribe_timeout
        self._clock = clock
        self._ws = Connection(ConnectionType.SERVER)
        self._labels = {channel: label for label, channel in ticket.subscribe.items()}
        # channel -> (epoch, offset) of the last message delivered on it
        self._positions: dict[str, tuple[str, int]] = {}
        # channels being (re)synchronised from history: live messages wait here
        self._held: dict[str, list[tuple[Envelope, bytes]]] = {}
        self._limiter = RateLimiter(ticket.limits.rate, ticket.limits.burst, now=clock())
        self._incoming: list[bytes | bytearray | str] = []
        self._incoming_size = 0
        self._closing = False
        # Live deliveries (Hub thread) and history replays (session thread) both
        # write to the transport and the positions: one at a time, in order. Under
        # gevent nothing between two sends can switch greenlets: no lock needed.
        self._cooperative = getattr(transport, "cooperative", False)
        self._lock: contextlib.AbstractContextManager[object] = (
            contextlib.nullcontext() if self._cooperative else threading.RLock()
        )

    # ----------------------------------------------------------------- main loop

    def run(self) -> None:
        """Serve the connection until either side closes it."""
        channels = list(self._labels)
        try:
            for channel in channels:
                self._held[channel] = []
            if channels:
                try:
                    self.hub.subscribe(self, channels, timeout=self._subscribe_timeout)
                except SubscribeTimeout:
                    logger.warning("Redis did not confirm subscriptions for %s", self.ticket.identity)
                    self.close(1013, "try again later")
                    return
            self._synchronise(channels, first=True)
            # The heartbeat interval lets clients notice a dead connection in time.
            self.transport.send(
                self._control(
                    "ready",
                    # sender: this connection's id; event-stream clients mark their POSTs
                    # with it, so that they are not echoed back (unless ``echo``)
                    {"type": "ready", "heartbeat": self.ticket.limits.heartbeat, "sender": self.id.decode("ascii")},
                )
            )
            self._loop()
        except Exception:
            logger.exception("websocket session of %s failed", self.ticket.identity)
            self.close(1011, "internal error")
        finally:
            if channels:
                self.hub.unsubscribe(self, channels)
            self.transport.close()

    def _loop(self) -> None:
        interval = self.ticket.limits.heartbeat
        now = self._clock()
        last_heard = now
        next_beat = now + interval
        transport = self.transport
        while not transport.closed:
            if self._closing:
                transport.drain(2.0)
                break
            data = transport.recv(max(0.0, next_beat - now))
            now = self._clock()
            if data == b"":
                break
            if data:
                last_heard = now
                self._received(data)
            if now >= next_beat:
                if self.answers_heartbeats and now - last_heard > 3 * interval:
                    logger.info("closing silent websocket of %s", self.ticket.identity)
                    self.close(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")
                    break
                self._heartbeat()
                next_beat = now + interval

    # ----------------------------------------------------------------- framing
    # What differs between a websocket and an event stream (see EventStreamSession).

    #: The client answers heartbeats (websocket pings), so silence means it is gone.
    answers_heartbeats = True

    def _received(self, data: bytes) -> None:
        self._ws.receive_data(data)
        self._handle_events()

    def _heartbeat(self) -> None:
        # The ping is answered by any client library; the heartbeat frame is for
        # browsers, whose scripts never see pings.
        self._send_event(Ping(b""))
        self.transport.send(HEARTBEAT_FRAME)

    def _control(self, event: str, document: dict[str, object]) -> bytes:
        return text_frame(document)

    def _message(self, label: str, envelope: Envelope, frame: bytes | None) -> bytes:
        """Return the bytes delivering ``envelope``; the Hub's shared ``frame`` if given."""
        return frame if frame is not None else client_frame(label, envelope)

    def _handle_events(self) -> None:
        for event in self._ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._on_data(event)
            elif isinstance(event, Ping):
                self._send_event(event.response())
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    self._send_event(event.response())
                elif self._ws.state is ConnectionState.OPEN:
                    # wsproto found a protocol error (e.g. invalid UTF-8): its code is ours.
                    logger.info("protocol error from %s: %s", self.ticket.identity, event.reason)
                    self._send_event(CloseConnection(event.code, "protocol error"))
                self._closing = True
                self.transport.drain(2.0)
                return
            if self._closing:
                return

    def _send_event(self, event: Event) -> None:
        with self._lock:  # the wsproto state is shared with the Hub's thread
            try:
                self.transport.send(self._ws.send(event))
            except Exception:  # wsproto refuses sends in a closing state
                logger.debug("not sending %r in state %s", event, self._ws.state)

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame (after anything already partly written) and stop."""
        if self._closing:
            return
        self._closing = True
        self._send_close(code, reason)
        self.transport.drain(2.0)

    def _send_close(self, code: int, reason: str) -> None:
        if self._ws.state is ConnectionState.OPEN:
            self._send_event(CloseConnection(code, reason))

    # ----------------------------------------------------------------- client frames

    def _on_data(self, event: TextMessage | BytesMessage) -> None:
        chunk = event.data
        self._incoming_size += len(chunk.encode("utf-8")) if isinstance(chunk, str) else len(chunk)
        if self._incoming_size > self.ticket.limits.max_message_size:
            logger.info("message from %s exceeds %d bytes", self.ticket.identity, self.ticket.limits.max_message_size)
            self.close(CloseReason.MESSAGE_TOO_BIG, "message too big")
            return
        self._incoming.append(chunk)
        if not event.message_finished:
            return
        parts, self._incoming, self._incoming_size = self._incoming, [], 0
        if isinstance(event, TextMessage):
            kind, payload = KIND_TEXT, "".join(parts).encode("utf-8")  # type: ignore[arg-type]
        else:
            kind, payload = KIND_BINARY, b"".join(parts)  # type: ignore[arg-type]
        self._publish(kind, payload)

    def _publish(self, kind: bytes, payload: bytes) -> None:
        if not self.ticket.publish:
            self._error("forbidden", "this connection may not publish")
            return
        if not self._limiter.allow(self._clock()):
            self._error("rate_limited", "rate limit exceeded: message dropped")
            return
        limits = self.ticket.limits
        try:
            self.store.publish(
                self.ticket.publish,
                kind,
                payload,
                sender=self.id,
                history_size=limits.history_size,
                history_ttl=limits.history_ttl,
                history_max_bytes=limits.history_max_bytes,
            )
        except PublishError as exc:
            logger.error("publish from %s failed: %s", self.ticket.identity, exc)
            self._error("unavailable", "message not published: server unavailable")

    def _error(self, code: str, text: str) -> None:
        """Tell the client its last message was not published: ``code`` is for programs."""
        self.transport.send(self._control("error", {"type": "error", "code": code, "error": text}))

    # ----------------------------------------------------------------- delivery

    def deliver(self, channel: str, envelope: Envelope, frame: bytes) -> None:
        """Take one live message from the Hub (never blocks)."""
        if self._cooperative:  # the broadcast path: no context manager per listener
            self._deliver_or_hold(channel, envelope, frame)
        else:
            with self._lock:
                self._deliver_or_hold(channel, envelope, frame)

    def _deliver_or_hold(self, channel: str, envelope: Envelope, frame: bytes) -> None:
        held = self._held.get(channel)
        if held is not None:
            held.append((envelope, frame))  # delivered after the history being replayed
        else:
            self._deliver(channel, envelope, frame)

    def _deliver(self, channel: str, envelope: Envelope, frame: bytes) -> None:
        position = self._positions.get(channel)
        if position is not None and position[0] == envelope.epoch and envelope.offset <= position[1]:
            return  # already delivered, from history
        self._positions[channel] = (envelope.epoch, envelope.offset)
        if envelope.sender == self.id and not self.ticket.echo:
            return
        transport = self.transport
        transport.send(self._message(self._labels[channel], envelope, frame))
        limits = self.ticket.limits
        if transport.queued_bytes > limits.queue_bytes or transport.queued_messages > limits.queue_messages:
            self._overflow()

    def _overflow(self) -> None:
        if self._closing:
            return
        logger.warning(
            "closing slow consumer %s: %d bytes in %d chunks waiting",
            self.ticket.identity,
            self.transport.queued_bytes,
            self.transport.queued_messages,
        )
        self.transport.discard_queued()
        self._closing = True
        self._send_close(CLOSE_SLOW_CONSUMER, "slow consumer")
        self.transport.interrupt()  # the session's loop then drains briefly and ends

    def going_away(self) -> None:
        """Close with 1012 (service restart) from another greenlet or thread."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._send_close(CLOSE_SERVICE_RESTART, "service restart")
        self.transport.interrupt()  # the session's loop then drains briefly and ends

    def resync(self, channel: str) -> None:
        """Recover ``channel`` from history after the Hub reconnected (never blocks)."""
        with self._lock:
            if channel in self._held or self._closing:
                return
            self._held[channel] = []
        threading.Thread(target=self._resync, args=(channel,), daemon=True).start()

    def _resync(self, channel: str) -> None:
        try:
            self._synchronise([channel], first=False)
        except Exception:
            logger.exception("could not resynchronise %s for %s", channel, self.ticket.identity)
            self.close(1011, "internal error")

    def _synchronise(self, channels: list[str], *, first: bool) -> None:
        """Deliver what history holds for ``channels``, then release held messages."""
        requests = []
        for channel in channels:
            label = self._labels[channel]
            if first:
                since = self.ticket.recover.get(label)
            else:
                epoch, offset = self._positions.get(channel, ("", 0))
                since = Position(offset, epoch)
            requests.append((channel, since, self.ticket.latest and first))
        states = self.store.fetch(requests)
        with self._lock:
            self._replay(requests, states)

    def _replay(self, requests: list[tuple[str, Position | None, bool]], states: list[ChannelState]) -> None:
        for (channel, since, latest), state in zip(requests, states, strict=True):
            label = self._labels[channel]
            outcome = decide_recovery(since, state.epoch, state.top, state.history, latest=latest)
            for envelope in outcome.envelopes:
                self._positions[channel] = (envelope.epoch, envelope.offset)
                if envelope.sender != self.id or self.ticket.echo:
                    self.transport.send(self._message(label, envelope, None))
            self._positions[channel] = (outcome.position.epoch, outcome.position.offset)
            self.transport.send(
                self._control(
                    "subscribed",
                    {
                        "type": "subscribed",
                        "channel": label,
                        "offset": outcome.position.offset,
                        "epoch": outcome.position.epoch,
                        "recovered": outcome.recovered,
                    },
                )
            )
            for envelope, frame in self._held.pop(channel, []):
                self._deliver(channel, envelope, frame)


class EventStreamSession(Session):
    """Serve a Server-Sent Events stream: the same subscriptions, history and
    recovery as a websocket, one way.

    Every event's id carries the positions of all channels, so the browser's
    automatic reconnection (Last-Event-ID) resumes exactly where it stopped. A
    ``heartbeat`` event every heartbeat keeps proxies from closing an idle stream.
    """

    answers_heartbeats = False

    def _received(self, data: bytes) -> None:
        pass  # a client has nothing to say on an event stream

    def _heartbeat(self) -> None:
        # An event, not a comment: proxies see traffic and the browser client's
        # watchdog (EventSource hides comments) sees that the stream is alive.
        self.transport.send(SSE_HEARTBEAT)

    def _event_id(self) -> str:
        return encode_event_id({self._labels[c]: (offset, epoch) for c, (epoch, offset) in self._positions.items()})

    def _control(self, event: str, document: dict[str, object]) -> bytes:
        data = json.dumps(document, separators=(",", ":"))
        return sse_event(event, data, self._event_id() if event == "subscribed" else None)

    def _message(self, label: str, envelope: Envelope, frame: bytes | None) -> bytes:
        return sse_event("message", sse_message_data(label, envelope), self._event_id())

    def _send_close(self, code: int, reason: str) -> None:
        self.transport.send(sse_event("close", json.dumps({"type": "close", "code": code, "reason": reason})))
