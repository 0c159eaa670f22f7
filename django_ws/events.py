"""The consumer behind ``manage.py ws_events``: presence changes become Django signals.

The websocket instances append every presence change to the project's Redis stream
(``{prefix:presence-events}``, bounded by ``PRESENCE_STREAM_SIZE``). This reads it
through a consumer group, so that

* it resumes where it stopped after a restart (the group remembers what it was given);
* several copies (on several hosts) share the work: each change is given to one of them;
* a copy that died holding changes it had not acknowledged loses none: after
  ``claim_idle`` seconds another copy claims and sends them (so a change is sent
  again only if a copy died between sending its signal and acknowledging it).

It also sweeps presence, so that the leaves of a worker that died are produced even
when no websocket worker is left running to do it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from uwsgi_ws.exceptions import RedisUnavailable
from uwsgi_ws.presence import sweep
from uwsgi_ws.protocol import Audience, parse_channel, presence_events_key

from .conf import get_settings
from .signals import SIGNALS

logger = logging.getLogger(__name__)

DEFAULT_GROUP = "django_ws"


@dataclass(frozen=True)
class Event:
    """One presence change read from the stream."""

    id: str
    kind: str
    facility: str
    channel: str
    audience: Audience
    user: str
    info: Any
    at: float


def parse(entry_id: str, fields: dict[bytes, bytes]) -> Event | None:
    """Read a stream entry; None (logged) when it is not one this version understands."""
    try:
        kind = fields[b"type"].decode()
        _, facility, audience = parse_channel(fields[b"channel"].decode())
        info = json.loads(fields[b"info"]) if b"info" in fields else None
        return Event(
            entry_id, kind, facility, audience.label, audience, fields[b"user"].decode(), info, float(fields[b"at"])
        )
    except (KeyError, ValueError, UnicodeDecodeError):
        logger.warning("ignoring a malformed presence change %s", entry_id)
        return None


def send(event: Event) -> None:
    """Send the event's signal; a receiver that raises is logged, the others still run."""
    signal = SIGNALS.get(event.kind)
    if signal is None:
        logger.warning("ignoring a presence change of unknown type %r", event.kind)
        return
    results = signal.send_robust(
        sender=event.facility,
        channel=event.channel,
        audience=event.audience,
        user=event.user,
        info=event.info,
        at=event.at,
        event_id=event.id,
    )
    for _receiver, result in results:
        if isinstance(result, Exception):
            logger.error("a receiver of %s failed: %r", event.kind, result, exc_info=result)


class Consumer:
    """Read presence changes as one member of a consumer group, and send their signals.

    Args:
        client: a Redis client.
        group: the consumer group: copies that share it share the changes.
        name: this copy's name in the group (unique per running copy).
        claim_idle: seconds after which changes given to a silent copy are taken over.
        block: seconds one read waits for new changes.
        count: changes read at once.
        on_event: called after each event's signal (``manage.py ws_events -v 2`` prints).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        group: str = DEFAULT_GROUP,
        name: str | None = None,
        claim_idle: float = 60.0,
        block: float = 1.0,
        count: int = 100,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        conf = get_settings()
        self.client = client
        self.key = presence_events_key(conf.prefix)
        self.group = group
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.claim_idle_ms = max(0, int(claim_idle * 1000))
        self.block_ms = max(1, int(block * 1000))
        self.count = count
        self.on_event = on_event
        self._sweep_every = conf.presence_ttl / 3
        self._next_sweep = 0.0
        self.stopping = False

    def start(self) -> None:
        """Create the group if it does not exist yet: it starts with the changes made from now on."""
        try:
            self.client.xgroup_create(self.key, self.group, id="$", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run_once(self) -> int:
        """Sweep when due, take over abandoned changes, read new ones; return how many were sent."""
        conf = get_settings()
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_every
            try:
                sweep(
                    self.client,
                    conf.prefix,
                    stream_size=conf.presence_stream_size,
                    publish_command=conf.publish_command,
                )
            except RedisUnavailable as exc:
                logger.warning("%s", exc)
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        if self.claim_idle_ms:
            claimed: Any = self.client.xautoclaim(
                self.key, self.group, self.name, self.claim_idle_ms, start_id="0-0", count=self.count
            )
            entries += [e for e in claimed[1] if e and e[1]]
        if not entries:
            answer: Any = self.client.xreadgroup(
                self.group, self.name, {self.key: ">"}, count=self.count, block=self.block_ms
            )
            for _, items in answer or []:
                entries += items
        for entry_id, fields in entries:
            if self.stopping:
                break  # what is left stays pending: taken over later, never lost
            event = parse(entry_id.decode(), fields)
            if event is not None:
                send(event)
                if self.on_event is not None:
                    self.on_event(event)
            self.client.xack(self.key, self.group, entry_id)
        return len(entries)

    def run(self) -> None:
        """Consume until :attr:`stopping` is set; ride out Redis outages."""
        delay = 0.5
        started = False
        while not self.stopping:
            try:
                if not started:
                    self.start()
                    started = True
                self.run_once()
                delay = 0.5
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # the stream was deleted (FLUSHALL?): create it again
                    started = False
                    continue
                raise
            except (RedisError, RedisClusterException) as exc:
                logger.warning("presence events: Redis error %s; retrying in %.1fs", type(exc).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
