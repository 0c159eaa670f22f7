"""The decisions of one connection, without I/O: events in, actions out.

A :class:`SessionCore` is told what happened (the Hub confirmed the subscriptions,
the history read finished, a message arrived from the Hub, the client sent bytes, a
timer fired, a publish went through or not, Django ordered a close) and answers with
the actions to take: send these bytes, read the history of these channels, publish
this message, finish the connection. It never touches a socket, Redis or a clock:
the drivers in :mod:`uwsgi_ws.session` move the bytes, run the reads and keep the
time, so every rule here is tested with plain values (tests/uwsgi_ws/test_core.py).

The rules, in one place:

* Order and exactly-once per channel. Live messages of a channel whose history is
  being read wait until the replay is done; then a message is delivered only if its
  offset is past the last one delivered in the same epoch (a new epoch starts
  over). So history and live delivery can overlap in any order without a duplicate
  or a reordering.
* Nothing after Close. Once the connection is closing (by either side, on order,
  on overflow), no data frame is produced again (RFC 6455, section 5.5.1).
* Bounded hostility. A client without publish rights, or one that keeps hitting the
  rate limit, is refused with an ``error`` frame a few times and then closed with
  1008. Work per call to :meth:`SessionCore.process` is bounded, so a driver can
  let other connections run between batches.
* Heartbeats by the clock; a client that answers nothing for three intervals is
  gone (4009); ``max_age`` sends clients back for fresh rights (4010).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from dataclasses import dataclass

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

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
    presence_channel,
    sse_event,
    sse_message_data,
    text_frame,
)
from .store import ChannelState

__all__ = [
    "Finish",
    "Publish",
    "ReadHistory",
    "Send",
    "SessionCore",
    "State",
    "EventStreamCore",
]

CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_SLOW_CONSUMER = 4008
CLOSE_HEARTBEAT_TIMEOUT = 4009
CLOSE_TOO_OLD = 4010

HEARTBEAT_FRAME = text_frame({"type": "heartbeat"})

# Refused client messages (no right to publish, over the rate limit) a connection may
# send before it is closed with 1008: a burst of REFUSALS, then one more every
# REFUSAL_INTERVAL seconds. A well-behaved client sees an error frame and stops.
REFUSALS = 5
REFUSAL_INTERVAL = 10.0

# Client events handled per call to process(): between batches the driver lets the
# other connections of the worker run.
EVENTS_PER_BATCH = 64


class State(enum.Enum):
    """Where a connection is in its life."""

    SUBSCRIBING = "subscribing"  # waiting for the Hub to confirm the subscriptions
    SYNCING = "syncing"  # the first history read is in flight
    OPEN = "open"
    CLOSING = "closing"  # a close was sent: only draining remains
    CLOSED = "closed"


@dataclass(frozen=True)
class Send:
    """Write these bytes to the client (in order, never blocking)."""

    data: bytes


@dataclass(frozen=True)
class ReadHistory:
    """Read these channels' state and history, then call ``history_read``.

    Each request is (channel, position to read after or None, latest), as
    :meth:`uwsgi_ws.store.Store.fetch` takes them.
    """

    requests: tuple[tuple[str, Position | None, bool], ...]


@dataclass(frozen=True)
class Publish:
    """Publish a client's message to the connection's publish channels, then call
    ``published`` with the outcome."""

    kind: bytes
    payload: bytes


@dataclass(frozen=True)
class Finish:
    """Stop reading; write what is queued (``discard``: drop what has not started to
    be written first) for a short while, and end the connection."""

    code: int
    discard: bool = False


Action = Send | ReadHistory | Publish | Finish


class SessionCore:
    """Decide everything about one websocket connection.

    Args:
        ticket: what the connection may do, as signed by Django.
        sender: this connection's id (the ``sender`` of its own publications).
        now: the monotonic time at creation.
    """

    #: The client answers heartbeats (websocket pings), so silence means it is gone.
    answers_heartbeats = True

    def __init__(self, ticket: Ticket, *, sender: bytes, now: float) -> None:
        self.ticket = ticket
        self.sender = sender
        self.state = State.SUBSCRIBING
        self.close_code: int | None = None
        self.labels = {channel: label for label, channel in ticket.subscribe.items()}
        # join/leave channel -> the label of the channel it tells about
        self._events_of = {presence_channel(c): self.labels[c] for c in ticket.presence_events if c in self.labels}
        #: The join/leave channels the driver subscribes to besides ``labels``.
        self.event_channels = tuple(self._events_of)
        self.positions: dict[str, Position] = {}
        # channels whose history is being read: their live messages wait here
        self._held: dict[str, list[tuple[Envelope, bytes | None]]] = {c: [] for c in self.labels}
        self._limiter = RateLimiter(ticket.limits.rate, ticket.limits.burst, now=now)
        self._refusals = RateLimiter(1 / REFUSAL_INTERVAL, REFUSALS, now=now)
        self._ws = Connection(ConnectionType.SERVER)
        self._events: Iterator[Event] | None = None
        #: Client events (frames) handled so far: the driver paces the reading by it.
        self.events_handled = 0
        #: Recoveries asked for (a recover position, or a gap after losing Redis) that
        #: were covered, and that were not; the driver reads and resets them.
        self.recovered = 0
        self.not_recovered = 0
        # The message being received, in fragments: its UTF-8 bytes, so that its
        # memory is what MAX_MESSAGE_SIZE counts, however many fragments it comes in
        # (a list of one-byte fragments costs some 60 times their size).
        self._incoming = bytearray()
        interval = ticket.limits.heartbeat
        self._interval = interval
        self._last_heard = now
        self._next_beat = now + interval
        self._too_old = now + ticket.max_age if ticket.max_age > 0 else float("inf")
        self._reading: list[tuple[str, str]] = []

    # ----------------------------------------------------------------- timers

    @property
    def next_timer(self) -> float:
        """The monotonic time by which :meth:`timer` must be called."""
        return min(self._next_beat, self._too_old)

    def timer(self, now: float) -> list[Action]:
        """The clock reached ``now``: heartbeats, silent clients, old connections."""
        if self.state is State.CLOSING or self.state is State.CLOSED:
            return []
        if now >= self._too_old:
            return self.close(CLOSE_TOO_OLD, "connection too old: reconnect")
        if now < self._next_beat:
            return []
        if self.answers_heartbeats and now - self._last_heard > 3 * self._interval:
            return self.close(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")
        self._next_beat = now + self._interval
        if self.state is not State.OPEN:
            return []
        return self._heartbeat()

    def _heartbeat(self) -> list[Action]:
        # The ping is answered by any client library; the heartbeat frame is for
        # browsers, whose scripts never see pings.
        return [*self._ws_send(Ping(b"")), Send(HEARTBEAT_FRAME)]

    # ----------------------------------------------------------------- subscriptions

    def subscribed(self) -> list[Action]:
        """The Hub confirmed every subscription: read the history to start from."""
        if self.state is not State.SUBSCRIBING:
            return []
        self.state = State.SYNCING
        # The channels read, in order: one may be unsubscribed before the read is done.
        self._reading = list(self.labels.items())
        requests = tuple(
            (channel, self.ticket.recover.get(label), self.ticket.latest) for channel, label in self._reading
        )
        if not requests:
            return self.history_read([])
        return [ReadHistory(requests)]

    def history_read(self, states: list[ChannelState]) -> list[Action]:
        """The first history read finished: replay, confirm each channel, then ready."""
        if self.state is not State.SYNCING:
            return []
        actions: list[Action] = []
        for (channel, label), state in zip(self._reading, states, strict=True):
            if channel not in self.labels:
                continue  # unsubscribed meanwhile
            since = self.ticket.recover.get(label)
            outcome = decide_recovery(since, state.epoch, state.top, state.history, latest=self.ticket.latest)
            if since is not None:
                if outcome.recovered:
                    self.recovered += 1
                else:
                    self.not_recovered += 1
            for envelope in outcome.envelopes:
                actions += self._deliver(channel, envelope, None)
            self.positions[channel] = _later(self.positions.get(channel), outcome.position)
            actions.append(Send(self._subscribed_frame(label, outcome.position, outcome.recovered)))
            for envelope, frame in self._held.pop(channel, []):
                actions += self._deliver(channel, envelope, frame)
        self.state = State.OPEN
        actions.append(Send(self._ready_frame()))
        return actions

    def failed(self, code: int = CLOSE_TRY_AGAIN_LATER, reason: str = "try again later") -> list[Action]:
        """Redis did not confirm the subscriptions, or a read failed: close."""
        return self.close(code, reason)

    # ----------------------------------------------------------------- Hub

    def hub_message(self, channel: str, envelope: Envelope, frame: bytes | None) -> list[Action]:
        """A live message arrived for ``channel`` (``frame``: the Hub's shared bytes)."""
        data = self.live(channel, envelope, frame)
        return [] if data is None else [Send(data)]

    def live(self, channel: str, envelope: Envelope, frame: bytes | None) -> bytes | None:
        """:meth:`hub_message` for the broadcast path: the bytes to send, or None.

        Called once per listening connection for every message, so it allocates
        nothing when it delivers the Hub's shared frame.
        """
        if self.state is State.CLOSING or self.state is State.CLOSED:
            return None  # nothing after Close
        if self._events_of:
            label = self._events_of.get(channel)
            if label is not None:
                return self._presence_event(label, envelope)
        if self._held:
            held = self._held.get(channel)
            if held is not None:
                held.append((envelope, frame))
                return None
        position = self.positions.get(channel)
        if position is not None and position.epoch == envelope.epoch and envelope.offset <= position.offset:
            return None  # delivered already (from history, or twice by the Hub)
        label = self.labels.get(channel)
        if label is None:
            return None  # unsubscribed on order; the Hub has not heard yet
        self.positions[channel] = Position(envelope.offset, envelope.epoch)
        if envelope.sender == self.sender and not self.ticket.echo:
            return None
        return self._message(label, envelope, frame)

    def resynced(self, channel: str, recovered: bool, position: Position) -> list[Action]:
        """The Hub caught up with ``channel`` after losing Redis.

        The messages it found in the history came first, through ``hub_message``;
        this tells the client whether that covered the gap.
        """
        if self.state is not State.OPEN or channel not in self.labels:
            return []  # still syncing: that read covers the gap by itself
        if recovered:
            self.recovered += 1
        else:
            self.not_recovered += 1
        current = self.positions.get(channel)
        if recovered and current is not None and current.epoch == position.epoch and current.offset >= position.offset:
            position = current
        self.positions[channel] = position
        return [Send(self._subscribed_frame(self.labels[channel], position, recovered))]

    def unsubscribe(self, channels: list[str]) -> list[Action]:
        """End these subscriptions on Django's order: nothing more is delivered on them
        from now on, and the client is told (``unsubscribed``). The connection stays."""
        if self.state is State.CLOSING or self.state is State.CLOSED:
            return []
        actions: list[Action] = []
        for channel in channels:
            label = self.labels.pop(channel, None)
            if label is None:
                continue
            self.positions.pop(channel, None)
            self._held.pop(channel, None)
            self._events_of.pop(presence_channel(channel), None)
            actions.append(Send(self._control("unsubscribed", {"type": "unsubscribed", "channel": label})))
        self.event_channels = tuple(self._events_of)
        return actions

    def _deliver(self, channel: str, envelope: Envelope, frame: bytes | None) -> list[Action]:
        position = self.positions.get(channel)
        if position is not None and position.epoch == envelope.epoch and envelope.offset <= position.offset:
            return []  # delivered already (from history, or twice by the Hub)
        self.positions[channel] = Position(envelope.offset, envelope.epoch)
        if envelope.sender == self.sender and not self.ticket.echo:
            return []
        return [Send(self._message(self.labels[channel], envelope, frame))]

    def position(self, channel: str) -> Position | None:
        """Where the client stands in ``channel``; None while its history is read."""
        if channel in self._held:
            return None
        return self.positions.get(channel)

    # ----------------------------------------------------------------- client bytes

    def receive(self, data: bytes, now: float) -> None:
        """Bytes arrived from the client; :meth:`process` handles them."""
        self._last_heard = now
        self._ws.receive_data(data)
        self._events = None

    def process(self, now: float, limit: int = EVENTS_PER_BATCH) -> tuple[list[Action], bool]:
        """Handle up to ``limit`` client events; return the actions and whether more wait."""
        actions: list[Action] = []
        if self.state is State.CLOSED:
            return actions, False
        if self._events is None:
            self._events = self._ws.events()
        for _ in range(limit):
            if self.state is State.CLOSING:
                return actions, False
            event = next(self._events, None)
            if event is None:
                self._events = None
                return actions, False
            self.events_handled += 1
            actions += self._on_event(event, now)
        return actions, True

    def _on_event(self, event: Event, now: float) -> list[Action]:
        if isinstance(event, (TextMessage, BytesMessage)):
            return self._on_data(event, now)
        if isinstance(event, Ping):
            return self._ws_send(event.response())
        if isinstance(event, CloseConnection):
            actions: list[Action] = []
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                actions += self._ws_send(event.response())  # the client closed: answer it
                code = event.code
            else:
                # wsproto found a protocol error (e.g. invalid UTF-8): its code is ours.
                actions += self._ws_send(CloseConnection(event.code, "protocol error"))
                code = event.code
            return [*actions, *self._finish(code)]
        return []

    def _on_data(self, event: TextMessage | BytesMessage, now: float) -> list[Action]:
        chunk = event.data
        self._incoming += chunk.encode("utf-8") if isinstance(chunk, str) else chunk
        if len(self._incoming) > self.ticket.limits.max_message_size:
            return self.close(CloseReason.MESSAGE_TOO_BIG, "message too big")
        if not event.message_finished:
            return []
        payload, self._incoming = bytes(self._incoming), bytearray()
        kind = KIND_TEXT if isinstance(event, TextMessage) else KIND_BINARY
        if not self.ticket.publish:
            return self._refuse("forbidden", "this connection may not publish", now)
        if not self._limiter.allow(now):
            return self._refuse("rate_limited", "rate limit exceeded: message dropped", now)
        return [Publish(kind, payload)]

    def published(self, refusal: str | None, now: float) -> list[Action]:
        """The driver ran a ``Publish``: ``refusal`` is None, ``"rate_limited"`` (the
        shared limit) or ``"unavailable"`` (Redis)."""
        if refusal is None or self.state is not State.OPEN:
            return []
        if refusal == "rate_limited":
            return self._refuse("rate_limited", "rate limit exceeded: message dropped", now)
        return [Send(self._error_frame("unavailable", "message not published: server unavailable"))]

    def _refuse(self, code: str, text: str, now: float) -> list[Action]:
        if not self._refusals.allow(now):
            return self.close(CLOSE_POLICY_VIOLATION, "too many refused messages")
        return [Send(self._error_frame(code, text))]

    # ----------------------------------------------------------------- closing

    def close(self, code: int, reason: str = "") -> list[Action]:
        """Close from this side (an order, a limit, a reload)."""
        if self.state is State.CLOSING or self.state is State.CLOSED:
            return []
        return [*self._close_frame(code, reason), *self._finish(code)]

    def overflow(self) -> list[Action]:
        """The send queue went over its bounds: drop what waits, say why, end."""
        if self.state is State.CLOSING or self.state is State.CLOSED:
            return []
        self.state = State.CLOSING
        self.close_code = CLOSE_SLOW_CONSUMER
        # The driver discards the queue first, so the close frame comes right after
        # whatever frame was half written.
        return [Finish(CLOSE_SLOW_CONSUMER, discard=True), *self._close_frame(CLOSE_SLOW_CONSUMER, "slow consumer")]

    def closed(self) -> None:
        """The transport is gone."""
        self.state = State.CLOSED

    def _finish(self, code: int | None) -> list[Action]:
        self.state = State.CLOSING
        self.close_code = code
        return [Finish(code if code is not None else 1005)]

    # ----------------------------------------------------------------- framing
    # What differs between a websocket and an event stream (see EventStreamCore).

    def _ws_send(self, event: Event) -> list[Action]:
        try:
            return [Send(self._ws.send(event))]
        except LocalProtocolError:  # wsproto refuses sends once closed
            return []

    def _close_frame(self, code: int, reason: str) -> list[Action]:
        if self._ws.state is not ConnectionState.OPEN:
            return []
        return self._ws_send(CloseConnection(code, reason))

    def _message(self, label: str, envelope: Envelope, frame: bytes | None) -> bytes:
        return frame if frame is not None else client_frame(label, envelope)

    def _control(self, event: str, document: dict[str, object]) -> bytes:
        return text_frame(document)

    def _subscribed_frame(self, label: str, position: Position, recovered: bool | None) -> bytes:
        document = {
            "type": "subscribed",
            "channel": label,
            "offset": position.offset,
            "epoch": position.epoch,
            "recovered": recovered,
        }
        return self._control("subscribed", document)

    def _presence_event(self, label: str, envelope: Envelope) -> bytes | None:
        """A join or leave of ``label``'s members, as a control frame (None: not now)."""
        if self.state is not State.OPEN:
            return None  # the client reads the roster once ready
        try:
            document = json.loads(envelope.payload)
            kind, user = document["type"], document["user"]
        except (ValueError, KeyError, TypeError):
            return None
        if kind not in ("join", "leave") or not isinstance(user, str):
            return None
        if user and user == self.ticket.presence_user:
            # Its own user: the join is this very connection's (it may arrive before or
            # after ready, depending on the Hub), and no leave can come while it is open.
            return None
        event: dict[str, object] = {"type": kind, "channel": label, "user": user}
        if kind == "join":
            event["info"] = document.get("info")
        return self._control(kind, event)

    def _ready_frame(self) -> bytes:
        # sender: this connection's id; event-stream clients mark their POSTs with it,
        # so that they are not echoed back (unless ``echo``)
        document = {"type": "ready", "heartbeat": self._interval, "sender": self.sender.decode("ascii")}
        return self._control("ready", document)

    def _error_frame(self, code: str, text: str) -> bytes:
        return self._control("error", {"type": "error", "code": code, "error": text})


class EventStreamCore(SessionCore):
    """Decide everything about a Server-Sent Events stream: the same subscriptions,
    history and recovery as a websocket, one way.

    Every event's id carries the positions of all channels, so the browser's
    automatic reconnection (Last-Event-ID) resumes exactly where it stopped. A
    ``heartbeat`` event every heartbeat keeps proxies from closing an idle stream.
    """

    answers_heartbeats = False

    def receive(self, data: bytes, now: float) -> None:
        pass  # a client has nothing to say on an event stream

    def process(self, now: float, limit: int = EVENTS_PER_BATCH) -> tuple[list[Action], bool]:
        return [], False

    def _heartbeat(self) -> list[Action]:
        # An event, not a comment: proxies see traffic and the browser client's
        # watchdog (EventSource hides comments) sees that the stream is alive.
        return [Send(SSE_HEARTBEAT)]

    def _event_id(self) -> str:
        return encode_event_id({self.labels[c]: (p.offset, p.epoch) for c, p in self.positions.items()})

    def _control(self, event: str, document: dict[str, object]) -> bytes:
        data = json.dumps(document, separators=(",", ":"))
        return sse_event(event, data, self._event_id() if event == "subscribed" else None)

    def _message(self, label: str, envelope: Envelope, frame: bytes | None) -> bytes:
        return sse_event("message", sse_message_data(label, envelope), self._event_id())

    def _close_frame(self, code: int, reason: str) -> list[Action]:
        return [Send(sse_event("close", json.dumps({"type": "close", "code": code, "reason": reason})))]


def _later(current: Position | None, other: Position) -> Position:
    """Return the later of two positions of one channel (``other`` if epochs differ)."""
    if current is not None and current.epoch == other.epoch and current.offset > other.offset:
        return current
    return other
