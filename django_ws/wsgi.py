"""Single-instance mode: Django and websockets in one uWSGI with the gevent loop.

Use this instead of Django's ``get_wsgi_application()`` in a small site's wsgi.py::

    from django_ws.wsgi import get_wsgi_application
    application = get_wsgi_application()

and start uWSGI with ``--gevent N --gevent-early-monkey-patch``. Django handles the
upgrade request as usual (the middleware authenticates and signs a ticket); once
Django has finished that request (database connections released), this wrapper
serves the websocket in the same greenlet with the same session code as the
websocket instance of the offload mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import django
from django.core.handlers.wsgi import WSGIHandler

from uwsgi_ws.app import WebSocketApplication
from uwsgi_ws.config import Config

from .conf import get_settings
from .middleware import SERVER_KEY, TICKET_VAR


class WebSocketWSGIHandler:
    """Wrap a Django WSGI handler so that websocket hand-overs are served in-process."""

    def __init__(self, django_app: Callable[..., Iterable[bytes]]) -> None:
        self.django_app = django_app
        self._websocket_app: WebSocketApplication | None = None

    def websocket_app(self) -> WebSocketApplication:
        if self._websocket_app is None:
            conf = get_settings()
            # What Django decides (secret, Redis, publish command) from its settings; the
            # rest from the DJANGO_WS_* variables the websocket instance reads too.
            environ = {
                **os.environ,
                "DJANGO_WS_SECRET": conf.ticket_secret.decode("utf-8"),
                "DJANGO_WS_REDIS_URL": conf.redis_url,
                "DJANGO_WS_PUBLISH_COMMAND": conf.publish_command,
            }
            self._websocket_app = WebSocketApplication(Config.from_env(environ))
        return self._websocket_app

    def close(self) -> None:
        """Stop the websocket side (its Hub and Redis connections), if it was started."""
        if self._websocket_app is not None:
            self._websocket_app.close()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # Only the middleware may put a ticket here, never the incoming request.
        environ.pop(TICKET_VAR, None)
        environ[SERVER_KEY] = "inline"

        def django_start_response(status: str, headers: list[Any], exc_info: Any = None) -> Any:
            if TICKET_VAR in environ:
                return lambda data: None
            return start_response(status, headers, exc_info)

        response = self.django_app(environ, django_start_response)
        if TICKET_VAR not in environ:
            return response
        # Closing the response ends Django's request: request_finished releases the
        # database connections before the websocket starts its long life.
        close = getattr(response, "close", None)
        if close is not None:
            close()
        return self.websocket_app()(environ, start_response)


def get_wsgi_application() -> WebSocketWSGIHandler:
    """Return Django's WSGI application, able to serve websockets in-process."""
    django.setup(set_prefix=False)
    return WebSocketWSGIHandler(WSGIHandler())
