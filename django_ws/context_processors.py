"""Template context: where websockets are, as seen by the browser."""

from __future__ import annotations

from django.http import HttpRequest

from .conf import get_settings


def websocket_uri(request: HttpRequest) -> str:
    """Return ``ws://host/ws/`` (``wss://`` when the request is secure).

    ``request.is_secure()`` honours SECURE_PROXY_SSL_HEADER, so a site behind a TLS
    proxy gets ``wss://``.
    """
    scheme = "wss://" if request.is_secure() else "ws://"
    return scheme + request.get_host() + get_settings().url


def websocket(request: HttpRequest) -> dict[str, str]:
    """Add ``WEBSOCKET_URI`` to the template context (add this to context_processors)."""
    return {"WEBSOCKET_URI": websocket_uri(request)}
