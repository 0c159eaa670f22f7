"""``publish()`` and ``disconnect()``: reach websockets from any synchronous code."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from uwsgi_ws.exceptions import BadRequest, InvalidArgument, PublishError, UnsupportedType
from uwsgi_ws.protocol import (
    CLOSE_DISCONNECTED,
    KIND_JSON,
    Audience,
    Disconnect,
    Kind,
    Unsubscribe,
    channel_name,
    check_close,
    control_channel,
    encode_disconnect,
    encode_payload,
    encode_unsubscribe,
    validate_facility,
)
from uwsgi_ws.redis_url import make_client
from uwsgi_ws.store import Published, Store

from . import metrics
from .conf import get_settings
from .identity import session_digest

__all__ = ["disconnect", "publish", "unsubscribe", "Published", "PublishError"]

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
        InvalidArgument: bad facility, or no audience given (a ValueError).
        UnsupportedType: the message or an audience has a type that cannot be sent
            (a TypeError).
        PublishError: Redis could not be reached; the message was not sent.
    """
    conf = get_settings()
    try:
        validate_facility(facility)
    except BadRequest as exc:
        raise InvalidArgument(exc.message) from None
    user_names = [_name(u, "users", _username) for u in _many(users, "users")]
    group_names = [_name(g, "groups", _group_name) for g in _many(groups, "groups")]
    session_keys = [_name(s, "sessions", _session_key) for s in _many(sessions, "sessions")]
    audiences: list[Audience] = [Audience(Kind.BROADCAST)] if broadcast else []
    audiences += [Audience(Kind.USER, n) for n in user_names]
    audiences += [Audience(Kind.GROUP, n) for n in group_names]
    # A session key never leaves Django: its channel is named by its digest.
    audiences += [Audience(Kind.SESSION, session_digest(k)) for k in session_keys]
    if not audiences:
        raise InvalidArgument(
            "publish() needs an audience: broadcast=True, users=[...], groups=[...] or sessions=[...]"
        )
    kind, payload = encode_payload(message)
    channels = [channel_name(conf.prefix, facility, a) for a in audiences]
    if _interceptors:
        call = PublishCall(facility, message, broadcast, user_names, group_names, session_keys, history, channels)
        return _interceptors[-1](call)
    return _send(channels, kind, payload, history_size=conf.history_size if history else 0, what=facility)


def _send(channels: list[str], kind: bytes, payload: bytes, *, history_size: int, what: str) -> list[Published]:
    """Publish through the process's client, with the configured retries."""
    conf = get_settings()
    store = Store(get_redis(), publish_command=conf.publish_command)
    delay = conf.publish_retry_delay
    started = time.perf_counter()
    for attempt in range(conf.publish_retries + 1):
        try:
            result = store.publish(
                channels,
                kind,
                payload,
                history_size=history_size,
                history_ttl=conf.history_ttl,
                history_max_bytes=conf.history_max_bytes,
            )
        except PublishError:
            if attempt == conf.publish_retries:
                metrics.failed()
                raise
            logger.warning("publish to %s failed, retrying in %.2fs", what, delay)
            time.sleep(delay)
            delay *= 2
            continue
        metrics.published(time.perf_counter() - started)
        return result
    raise AssertionError("unreachable")  # pragma: no cover


# Orders kept on the control channel, so that a worker whose Redis connection broke
# can still carry out those given meanwhile (see uwsgi_ws.control).
CONTROL_HISTORY_SIZE = 1000


def disconnect(
    *,
    users: Iterable[Any] = (),
    groups: Iterable[Any] = (),
    sessions: Iterable[Any] = (),
    code: int = CLOSE_DISCONNECTED,
    reason: str = "",
) -> int:
    """Close the open websockets and event streams of these users, groups and sessions.

    The order goes through Redis to every websocket instance and worker, so any
    Django process may give it (a view, a command, a task). It closes every matching
    connection, whatever it subscribes to; a client that connects again is
    authorized again, with its rights of that moment.

    Args:
        users: users (or usernames) whose connections to close.
        groups: groups (or names): the connections of their members (membership as
            it was when each connection was made).
        sessions: sessions (keys, session objects or requests).
        code: the websocket close code, 4000-4999 (4008, 4009, 4010 are the
            server's own). 4100-4199 (default 4100) tell the browser client not to
            reconnect: it emits a ``disconnected`` event instead. Other codes make it
            reconnect, e.g. to pick up changed rights.
        reason: a short text for the client (at most 120 bytes in UTF-8).

    Returns:
        The number of websocket workers that received the order.

    Raises:
        InvalidArgument: no target, or a bad code or reason (a ValueError).
        UnsupportedType: a target of a type that cannot be named (a TypeError).
        PublishError: Redis could not be reached; nothing was closed.
    """
    check_close(code, reason)
    tags = [Audience(Kind.USER, _name(u, "users", _username)).tag for u in _many(users, "users")]
    tags += [Audience(Kind.GROUP, _name(g, "groups", _group_name)).tag for g in _many(groups, "groups")]
    tags += [
        Audience(Kind.SESSION, session_digest(_name(s, "sessions", _session_key))).tag
        for s in _many(sessions, "sessions")
    ]
    if not tags:
        raise InvalidArgument("disconnect() needs a target: users=[...], groups=[...] or sessions=[...]")
    order = Disconnect(tuple(dict.fromkeys(tags)), code, reason, time.time())
    channel = control_channel(get_settings().prefix)
    published = _send([channel], KIND_JSON, encode_disconnect(order), history_size=CONTROL_HISTORY_SIZE, what="control")
    return published[0].receivers


def unsubscribe(
    *,
    users: Iterable[Any] = (),
    groups: Iterable[Any] = (),
    sessions: Iterable[Any] = (),
    group: Any = None,
    broadcast: bool = False,
    facility: str | None = None,
) -> int:
    """End one subscription of the open connections of these users, groups and sessions.

    Unlike :func:`disconnect`, the connections stay open: only the named channel stops,
    at once (a message published after this call returns is not delivered on it),
    and each client gets an ``unsubscribed`` frame (event) with the channel's label.
    Their other subscriptions go on; they also leave that channel's presence.

    Args:
        users, groups, sessions: whose connections, as for :func:`disconnect`.
        group: the group channel to end (a group or its name), e.g. the group the
            user was just removed from.
        broadcast: end the broadcast subscription instead.
        facility: only in this facility (None: in every facility).

    Returns:
        The number of websocket workers that received the order.

    Raises:
        InvalidArgument: no target, not exactly one channel, or a bad facility.
        UnsupportedType: a target of a type that cannot be named.
        PublishError: Redis could not be reached; nothing was changed.
    """
    if (group is not None) == bool(broadcast):
        raise InvalidArgument("unsubscribe() needs one channel: group=<group or name> or broadcast=True")
    if facility is not None:
        try:
            validate_facility(facility)
        except BadRequest as exc:
            raise InvalidArgument(exc.message) from None
    audience = Audience(Kind.BROADCAST) if broadcast else Audience(Kind.GROUP, _name(group, "group", _group_name))
    tags = [Audience(Kind.USER, _name(u, "users", _username)).tag for u in _many(users, "users")]
    tags += [Audience(Kind.GROUP, _name(g, "groups", _group_name)).tag for g in _many(groups, "groups")]
    tags += [
        Audience(Kind.SESSION, session_digest(_name(s, "sessions", _session_key))).tag
        for s in _many(sessions, "sessions")
    ]
    if not tags:
        raise InvalidArgument("unsubscribe() needs a target: users=[...], groups=[...] or sessions=[...]")
    order = Unsubscribe(tuple(dict.fromkeys(tags)), audience.label, facility, time.time())
    channel = control_channel(get_settings().prefix)
    published = _send(
        [channel], KIND_JSON, encode_unsubscribe(order), history_size=CONTROL_HISTORY_SIZE, what="control"
    )
    return published[0].receivers


def _many(values: Iterable[Any], name: str) -> Iterable[Any]:
    if isinstance(values, (str, bytes)):
        raise UnsupportedType(f"{name} must be a list, not a single {type(values).__name__}: use {name}=[{values!r}]")
    return values


def _name(value: Any, what: str, get: Any) -> str:
    name = value if isinstance(value, str) else get(value)
    if not isinstance(name, str) or not name:
        raise UnsupportedType(f"cannot tell the name of {value!r} in {what}")
    return name


def _username(user: Any) -> str | None:
    return user.get_username() if hasattr(user, "get_username") else None


def _group_name(group: Any) -> str | None:
    return getattr(group, "name", None)


def _session_key(value: Any) -> str | None:
    session = getattr(value, "session", value)  # an HttpRequest, or a session
    return getattr(session, "session_key", None)
