"""Exceptions raised by :mod:`uwsgi_ws`.

The hierarchy::

    WebSocketError
    ├── BadRequest            the client asked for something malformed (HTTP 400)
    │   └── Refused           the request is well formed but not allowed (HTTP 403)
    ├── TicketError           a hand-over ticket is missing, forged or expired (HTTP 403)
    ├── PublishError          a message could not be handed to Redis: never a silent loss
    ├── InvalidArgument       a call got a value it cannot use (also a ValueError)
    ├── UnsupportedType       a call got a type it cannot use (also a TypeError)
    ├── RedisUnavailable      Redis could not be reached for something other than a publish
    │   └── SubscribeTimeout  Redis did not confirm a subscription in time
    └── ConfigurationError    a setting or environment variable has a bad value

Every exception carries the data in attributes; the text is meant for logs and for
the short explanation a client receives. Nothing sent to a client contains another
exception's text, and neither does an error about Redis: the Redis error is its
``__cause__``, for the logs. ``InvalidArgument`` and ``UnsupportedType`` are also
``ValueError`` and ``TypeError``, so code that caught those keeps working.
"""

from __future__ import annotations


class WebSocketError(Exception):
    """Root of every exception raised by this package."""


class BadRequest(WebSocketError):
    """The client's request is malformed; answered with an HTTP 4xx status."""

    status = 400

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class Refused(BadRequest):
    """The request is well formed but not allowed (origin, authorization)."""

    status = 403


class TicketError(WebSocketError):
    """A hand-over ticket is missing, malformed, forged or expired."""

    status = 403

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PublishError(WebSocketError):
    """A message could not be stored and published; nothing was silently dropped."""


class RedisUnavailable(WebSocketError):
    """Redis could not be reached or refused a command (not a publish: see PublishError)."""


class SubscribeTimeout(RedisUnavailable):
    """Redis did not confirm a subscription in time."""


class InvalidArgument(WebSocketError, ValueError):
    """A call got a value it cannot use (a bad facility, no audience, a bad close code)."""


class UnsupportedType(WebSocketError, TypeError):
    """A call got a type it cannot use (a message that is not text, bytes or JSON)."""


class ConfigurationError(WebSocketError):
    """A setting or environment variable has a value that cannot work."""
