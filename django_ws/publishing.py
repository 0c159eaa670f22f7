"""``publish()``: push a message to websockets from any synchronous code."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from uwsgi_ws.exceptions import BadRequest, PublishError
from uwsgi_ws.protocol import Audience, Kind, channel_name, encode_payload, validate_facility
from uwsgi_ws.redis_url import make_client
from uwsgi_ws.store import Published, Store

from .conf import get_settings

__all__ = ["publish", "Published", "PublishError"]

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}


@dataclass(frozen=True)
class PublishCall:
    """A checked ``publish()`` call, as handed to an interceptor (see django_ws.testing)."""

    facility: str
    message: Any
    broadcast: bool
    users: list[str]
    groups: list[str]
    sessions: list[str]
    history: bool
    channels: list[str]


_interceptors: list[Callable[[PublishCall], list[Published]]] = []


@contextlib.contextmanager
def intercept(handler: Callable[[PublishCall], list[Published]]) -> Iterator[None]:
    """Send every ``publish()`` call to ``handler`` instead of Redis while active."""
    _interceptors.append(handler)
    try:
        yield
    finally:
        _interceptors.remove(handler)


def get_redis() -> redis.Redis:
    """Return the process's Redis client for ``DJANGO_WS["REDIS_URL"]``, made on first use."""
    url = get_settings().redis_url
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                client = _clients[url] = make_client(
                    url,
                    socket_timeout=5.0,
                    socket_connect_timeout=5.0,
                    health_check_interval=30,
                    client_name="django_ws:publish",
                )
    return client


def publish(
    facility: str,
    message: Any,
    *,
    broadcast: bool = False,
    users: Iterable[Any] = (),
    groups: Iterable[Any] = (),
    sessions: Iterable[Any] = (),
    history: bool = True,
) -> list[Published]:
    """Send ``message`` to the websockets of ``facility`` that listen to the given audiences.

    Args:
        facility: the facility name (the URL part after ``WEBSOCKET_URL``).
        message: ``str`` (sent as text), ``bytes`` (sent as a binary frame) or any
            JSON-serialisable value (sent as text, decoded by the browser client).
        broadcast: reach every ``subscribe-broadcast`` client of the facility.
        users: users (or usernames) whose ``subscribe-user`` clients to reach.
        groups: groups (or group names) whose members' ``subscribe-group`` clients to reach.
        sessions: sessions (session keys, session objects or requests) whose
            ``subscribe-session`` clients to reach.
        history: keep the message for recovery (``HISTORY_SIZE`` > 0 needed).

    Returns:
        One :class:`~uwsgi_ws.store.Published` per channel: its offset, epoch, and how
        many websocket workers received it live.

    Raises:
        ValueError: bad facility, or no audience given.
        TypeError: the message or an audience has a type that cannot be sent.
        PublishError: Redis could not be reached; the message was not sent.
    """
    conf = get_settings()
    try:
        validate_facility(facility)
    except BadRequest as exc:
        raise ValueError(exc.message) from None
    user_names = [_name(u, "users", _username) for u in _many(users, "users")]
    group_names = [_name(g, "groups", _group_name) for g in _many(groups, "groups")]
    session_keys = [_name(s, "sessions", _session_key) for s in _many(sessions, "sessions")]
    audiences: list[Audience] = [Audience(Kind.BROADCAST)] if broadcast else []
    audiences += [Audience(Kind.USER, n) for n in user_names]
    audiences += [Audience(Kind.GROUP, n) for n in group_names]
    audiences += [Audience(Kind.SESSION, k) for k in session_keys]
    if not audiences:
        raise ValueError("publish() needs an audience: broadcast=True, users=[...], groups=[...] or sessions=[...]")
    kind, payload = encode_payload(message)
    channels = [channel_name(conf.prefix, facility, a) for a in audiences]
    if _interceptors:
        call = PublishCall(facility, message, broadcast, user_names, group_names, session_keys, history, channels)
        return _interceptors[-1](call)
    store = Store(get_redis(), publish_command=conf.publish_command)
    delay = conf.publish_retry_delay
    for attempt in range(conf.publish_retries + 1):
        try:
            return store.publish(
                channels,
                kind,
                payload,
                history_size=conf.history_size if history else 0,
                history_ttl=conf.history_ttl,
                history_max_bytes=conf.history_max_bytes,
            )
        except PublishError:
            if attempt == conf.publish_retries:
                raise
            logger.warning("publish to %s failed, retrying in %.2fs", facility, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _many(values: Iterable[Any], name: str) -> Iterable[Any]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a list, not a single {type(values).__name__}: use {name}=[{values!r}]")
    return values


def _name(value: Any, what: str, get: Any) -> str:
    name = value if isinstance(value, str) else get(value)
    if not isinstance(name, str) or not name:
        raise TypeError(f"cannot tell the name of {value!r} in {what}")
    return name


def _username(user: Any) -> str | None:
    return user.get_username() if hasattr(user, "get_username") else None


def _group_name(group: Any) -> str | None:
    return getattr(group, "name", None)


def _session_key(value: Any) -> str | None:
    session = getattr(value, "session", value)  # an HttpRequest, or a session
    return getattr(session, "session_key", None)
