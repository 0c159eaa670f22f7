"""Orders from Django to the connections of every worker: ``disconnect()`` and
``unsubscribe()``.

Django publishes an order (which tags to close, with which code) on the project's
control channel, with a short history, like any message. Each worker's
:class:`Controller` listens on that channel through the worker's Hub (one
subscription per worker, whatever the number of connections), finds the local
connections carrying one of the order's tags in an index, and closes them. After
the Hub lost its Redis connection, the controller reads the orders it missed from
the channel's history (the Hub does that for every channel of the worker), so a
logout during a Redis failover still closes the sockets of that session once
Redis is back.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from .hub import Subscriptions
from .protocol import Disconnect, Envelope, Position, Unsubscribe, control_channel, decode_control
from .store import Store

logger = logging.getLogger(__name__)


class Closable(Protocol):
    """What the controller needs of a connection."""

    @property
    def tags(self) -> tuple[str, ...]: ...

    @property
    def started(self) -> float:
        """Unix time at which the connection was accepted."""

    def close_soon(self, code: int, reason: str) -> None:
        """Close the connection from another greenlet or thread; never blocks."""

    def unsubscribe_soon(self, audience: str, facility: str | None) -> bool:
        """End the subscriptions to ``audience`` (in ``facility``, or any); never blocks.

        Returns whether the connection had such a subscription.
        """


class Controller:
    """Carry out the control orders of one project (one Redis prefix) in this worker.

    Args:
        prefix: the project's Redis prefix.
        hub: the worker's Hub (or ShardedHub).
        store: Redis access, to read missed orders after a reconnection.
        clock_skew: seconds of clock difference tolerated between Django's hosts
            and this one when telling whether a connection predates an order.
    """

    def __init__(
        self,
        prefix: str,
        hub: Subscriptions,
        store: Store,
        *,
        clock_skew: float = 5.0,
    ) -> None:
        self.channel = control_channel(prefix)
        self._hub = hub
        self._store = store
        self._skew = clock_skew
        self._lock = threading.Lock()
        self._by_tag: dict[str, set[Closable]] = {}
        self._subscribed = False
        # The last order seen (epoch, offset): where to resume after a reconnection.
        self._position = Position(0, "")

    # ----------------------------------------------------------------- connections

    def add(self, connection: Closable, *, timeout: float) -> None:
        """Index ``connection`` by its tags; the first one subscribes the worker.

        Raises:
            SubscribeTimeout: Redis did not confirm the control subscription.
            RedisUnavailable: the control channel's position could not be read.
        """
        if not self._subscribed:
            self._start(timeout)
        with self._lock:
            for tag in connection.tags:
                self._by_tag.setdefault(tag, set()).add(connection)

    def remove(self, connection: Closable) -> None:
        with self._lock:
            for tag in connection.tags:
                members = self._by_tag.get(tag)
                if members is not None:
                    members.discard(connection)
                    if not members:
                        del self._by_tag[tag]

    def _start(self, timeout: float) -> None:
        # Subscribe first, then read where the channel stands: an order published in
        # between arrives live and is applied, and its offset only moves us forward.
        self._hub.subscribe(self, [self.channel], timeout=timeout)
        (state,) = self._store.fetch([(self.channel, None, False)])
        with self._lock:
            if not self._subscribed:
                if state.epoch is not None and self._position.offset == 0:
                    self._position = Position(state.top, state.epoch)
                self._subscribed = True

    # ----------------------------------------------------------------- Hub listener

    def deliver(self, channel: str, envelope: Envelope, frame: bytes) -> None:
        with self._lock:
            self._position = Position(envelope.offset, envelope.epoch)
        self._apply(envelope)

    def resynced(self, channel: str, recovered: bool, position: Position) -> None:
        # The Hub delivered the orders it found in the history (through deliver).
        if not recovered:
            logger.warning("some disconnect orders may have been lost while Redis was unreachable")
        with self._lock:
            self._position = position

    def resync_failed(self, channel: str) -> None:
        logger.warning("could not read the disconnect orders missed while Redis was unreachable")

    def position(self, channel: str) -> Position | None:
        with self._lock:
            return self._position

    # ----------------------------------------------------------------- orders

    def _apply(self, envelope: Envelope) -> None:
        try:
            order = decode_control(envelope.payload)
        except ValueError as exc:
            logger.warning("ignoring a malformed control message: %s", exc)
            return
        self.execute(order)

    def execute(self, order: Disconnect | Unsubscribe) -> int:
        """Close the local connections that carry one of the order's tags (or end their
        subscription, for an :class:`Unsubscribe`); return how many."""
        with self._lock:
            targets: set[Closable] = set()
            for tag in order.tags:
                targets.update(self._by_tag.get(tag, ()))
        closed = 0
        for connection in targets:
            # A connection authorized clearly after the order is not its target.
            if connection.started > order.issued + self._skew:
                continue
            if isinstance(order, Unsubscribe):
                closed += connection.unsubscribe_soon(order.audience, order.facility)
                continue
            connection.close_soon(order.code, order.reason)
            closed += 1
        if isinstance(order, Unsubscribe):
            if closed:
                logger.info("ended %d subscription(s) to %s on order", closed, order.audience)
        elif closed:
            logger.info("closed %d connection(s) on order (code %d)", closed, order.code)
        return closed

    @property
    def connections(self) -> int:
        """The number of indexed (tagged) connections, for tests and metrics."""
        with self._lock:
            return len({c for members in self._by_tag.values() for c in members})
