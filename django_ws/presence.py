"""``presence()`` and ``presence_count()``: who is connected to a channel, from Django.

The websocket instances keep the rosters in Redis (see :mod:`uwsgi_ws.presence`);
any Django process reads them. The browser asks the same question with a GET on the
facility URL (``?presence=group:staff``), answered by the middleware to clients that
may subscribe to that channel.
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import HttpRequest

from uwsgi_ws import presence as store
from uwsgi_ws.exceptions import BadRequest, InvalidArgument, Refused
from uwsgi_ws.presence import Member, Occupancy, Roster
from uwsgi_ws.protocol import Audience, Kind, channel_name, validate_facility

from .conf import WsSettings, get_settings

__all__ = ["Member", "Occupancy", "Roster", "presence", "presence_count"]

logger = logging.getLogger(__name__)

#: The largest ``PRESENCE_INFO`` result, in bytes of compact JSON, kept per connection.
MAX_INFO_BYTES = 1024


def _channel(facility: str, *, broadcast: bool, group: Any, user: Any) -> str:
    from .publishing import _group_name, _name, _username

    try:
        validate_facility(facility)
    except BadRequest as exc:
        raise InvalidArgument(exc.message) from None
    given = [broadcast is True, group is not None, user is not None]
    if sum(given) != 1:
        raise InvalidArgument("name one channel: broadcast=True, group=<group or name> or user=<user or username>")
    if broadcast:
        audience = Audience(Kind.BROADCAST)
    elif group is not None:
        audience = Audience(Kind.GROUP, _name(group, "group", _group_name))
    else:
        audience = Audience(Kind.USER, _name(user, "user", _username))
    return channel_name(get_settings().prefix, facility, audience)


def presence(facility: str, *, broadcast: bool = False, group: Any = None, user: Any = None) -> Roster:
    """Return who is connected to one channel of ``facility``, on every instance.

    Exactly one of ``broadcast=True``, ``group`` (a group or its name) or ``user`` (a
    user or a username) names the channel. Costs one round trip and O(members).

    Returns:
        A :class:`~uwsgi_ws.presence.Roster`: ``members`` (username, connections,
        since, info), ``anonymous`` (connections without a user: counted, never
        listed) and ``connections``.

    Raises:
        InvalidArgument: a bad facility, or not exactly one channel named.
        RedisUnavailable: Redis could not be reached.
    """
    from .publishing import get_redis

    return store.read(get_redis(), _channel(facility, broadcast=broadcast, group=group, user=user))


def presence_count(facility: str, *, broadcast: bool = False, group: Any = None, user: Any = None) -> Occupancy:
    """Return how many connections and users one channel has, in O(1).

    Takes the same arguments as :func:`presence`. Connections of a worker that died
    count until its entries expire (``PRESENCE_TTL``).
    """
    from .publishing import get_redis

    return store.count(get_redis(), _channel(facility, broadcast=broadcast, group=group, user=user))


def info_for(request: HttpRequest, conf: WsSettings) -> Any:
    """Run the ``PRESENCE_INFO`` hook for a connection; None when there is none or it is unfit.

    The result goes into the signed ticket and into Redis for as long as the
    connection lives, so it must be a JSON object of at most :data:`MAX_INFO_BYTES`.
    """
    import json

    if conf.presence_info is None:
        return None
    info = conf.presence_info(request)
    if info is None:
        return None
    try:
        text = json.dumps(info, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        text = ""
    if not isinstance(info, dict) or not text or len(text.encode("utf-8")) > MAX_INFO_BYTES:
        logger.error(
            "DJANGO_WS['PRESENCE_INFO'] must return a JSON object of at most %d bytes (or None); ignored",
            MAX_INFO_BYTES,
        )
        return None
    return info


def requested_channel(request: HttpRequest, facility: str, label: str, conf: WsSettings) -> str:
    """Return the channel a presence GET asks about, if the client may subscribe to it.

    Raises:
        BadRequest: a label that names no channel with presence (400).
        Refused: the client may not subscribe to that channel (403).
    """
    from .middleware import _require, resolve

    if label == "broadcast":
        kind, name = Kind.BROADCAST, ""
    elif label == "user":
        kind, name = Kind.USER, ""
    elif label.startswith("group:") and len(label) > 6:
        kind, name = Kind.GROUP, label[6:]
    else:
        raise BadRequest("presence must name a channel: broadcast, user or group:<name>")
    # The client's own audiences of that kind: a group of someone else is not among them.
    for audience in resolve(request, kind, "subscribe"):
        if kind is not Kind.GROUP or audience.name == name:
            _require(conf, request, facility, "subscribe", audience)
            return channel_name(conf.prefix, facility, audience)
    raise Refused(f"not allowed to subscribe to {label}")
