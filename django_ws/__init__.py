"""Real-time push from Django to browsers over websockets, uWSGI and Redis.

Call :func:`publish` from views, management commands or task workers, and
:func:`disconnect` to close the connections of users, groups or sessions,
:func:`unsubscribe` to end one of their subscriptions, :func:`presence` to see who
is connected.
"""

from __future__ import annotations

from uwsgi_ws.exceptions import InvalidArgument, PublishError, UnsupportedType, WebSocketError

from .presence import presence, presence_count
from .publishing import disconnect, publish, unsubscribe

__all__ = [
    "disconnect",
    "presence",
    "presence_count",
    "publish",
    "unsubscribe",
    "InvalidArgument",
    "PublishError",
    "UnsupportedType",
    "WebSocketError",
]
