"""Who a request is, in forms that are safe to put in Redis names, tickets and logs.

A session key is a login credential: whoever reads it can act as that user. It never
leaves Django as it is. Channels, keys, tickets and log lines carry its keyed digest
instead (HMAC-SHA256 under a key derived from ``SECRET_KEY``, so every Django process
of the site, web workers, commands and task workers alike, maps a session to the same
name, and nobody without ``SECRET_KEY`` can go back from a digest to the key or find
the digest of a key they guessed).
"""

from __future__ import annotations

from typing import Any

from django.utils.crypto import salted_hmac

from uwsgi_ws.exceptions import UnsupportedType

_SALT = "django_ws.identity.session"


def session_digest(session_key: str) -> str:
    """Return the name under which the session ``session_key`` appears outside Django."""
    if not isinstance(session_key, str) or not session_key:
        raise UnsupportedType(f"a session key must be a non-empty string, not {session_key!r}")
    return salted_hmac(_SALT, session_key, algorithm="sha256").hexdigest()[:40]


def request_session_digest(request: Any) -> str | None:
    """Return the digest of the request's session, or None when it has none."""
    session = getattr(request, "session", None)
    key = getattr(session, "session_key", None) if session is not None else None
    return session_digest(key) if key else None


def client_identity(request: Any) -> str:
    """Return who sent ``request``, for logs and per-client limits.

    ``user:<pk>`` for a logged-in user, ``session:<digest>`` for an anonymous client
    with a session, ``addr:<REMOTE_ADDR>`` otherwise.
    """
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    digest = request_session_digest(request)
    if digest:
        return f"session:{digest}"
    return "addr:" + str(getattr(request, "META", {}).get("REMOTE_ADDR") or "unknown")
