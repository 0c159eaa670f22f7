"""Close the websockets of a session when the session ends (``DISCONNECT_ON_LOGOUT``).

A socket opened before a logout would otherwise keep receiving the user's private
messages for as long as it lives (heartbeats keep it alive). Two ways a session
ends are watched:

* ``user_logged_out``, which ``django.contrib.auth.logout()`` sends wherever it is
  called (even outside a request that went through the middleware);
* ``flush()`` or ``cycle_key()`` of ``request.session`` during a request that went
  through :class:`~django_ws.middleware.WebSocketMiddleware` (login cycles the key;
  a view may flush the session itself).

Either way the session's connections are closed with code 4100 through
:func:`django_ws.disconnect` (once per request and session key).
"""

from __future__ import annotations

import logging
from typing import Any

from uwsgi_ws.exceptions import PublishError

from .conf import get_settings

logger = logging.getLogger(__name__)

_ENDED = "_django_ws_ended_sessions"  # request attribute: keys already closed


def on_user_logged_out(sender: Any, request: Any = None, user: Any = None, **kwargs: Any) -> None:
    """Signal receiver: close the connections of the session that logged out."""
    if request is None or not get_settings().disconnect_on_logout:
        return
    key = getattr(getattr(request, "session", None), "session_key", None)
    if key:
        close_sessions(request, [key])  # logout() flushes the session just after this


def watch_session(request: Any) -> list[str] | None:
    """Record the keys of the request's session that ``flush()``/``cycle_key()`` end.

    Returns the list that collects them (None when the request has no session).
    Wrapping the two methods of this request's session object costs nothing when
    they are not called, and tells a real logout from a stale cookie (which also
    leaves the request with no session key, but ended nothing).
    """
    session = getattr(request, "session", None)
    if session is None:
        return None
    ended: list[str] = []
    for name in ("flush", "cycle_key"):
        original = getattr(session, name, None)
        if original is None:
            continue

        def ending(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            key = session.session_key
            if key:
                ended.append(key)
            return _original(*args, **kwargs)

        setattr(session, name, ending)
    return ended


def close_ended_sessions(request: Any, ended: list[str]) -> None:
    """After the response: close the sessions that ``flush()``/``cycle_key()`` ended."""
    current = getattr(getattr(request, "session", None), "session_key", None)
    close_sessions(request, [key for key in ended if key != current])


def close_sessions(request: Any, keys: list[str]) -> None:
    """Close the connections of the session ``keys`` not closed yet for this request."""
    done: set[str] = getattr(request, _ENDED, set())
    todo = [k for k in dict.fromkeys(keys) if k not in done]
    if not todo:
        return
    done.update(todo)
    setattr(request, _ENDED, done)
    from .publishing import disconnect

    try:
        disconnect(sessions=todo, reason="session ended")
    except PublishError as exc:
        logger.warning("could not close the websockets of %d ended session(s): %s", len(todo), exc)
