"""Helpers for testing projects that use django_ws.

Fast unit tests, no Redis::

    from django_ws.testing import capture_publishes

    def test_view_notifies(client):
        with capture_publishes() as sent:
            client.post("/orders/1/ship/")
        assert sent[0].facility == "orders" and sent[0].users == ["alice"]

Live tests, real websockets to a live server (Redis needed, as in production)::

    from django_ws.testing import WebSocketLiveServerTestCase

    class ChatTests(WebSocketLiveServerTestCase):
        def test_private_message(self):
            alice = User.objects.create_user("alice")
            with self.websocket("chat", "subscribe-user", user=alice) as ws:
                django_ws.publish("chat", "hi", users=[alice])
                self.assertEqual(ws.receive_message(), "hi")

With pytest, the ``ws_live_server`` fixture of :mod:`django_ws.testing_pytest`
gives the same server.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from typing import Any

from django.core.servers.basehttp import ThreadedWSGIServer
from django.test import LiveServerTestCase
from django.test.testcases import LiveServerThread, QuietWSGIRequestHandler

from uwsgi_ws.protocol import parse_binary_message
from uwsgi_ws.store import Published

from . import publishing
from .devserver import WebSocketRequestHandler
from .wsgi import WebSocketWSGIHandler

__all__ = [
    "CapturedPublish",
    "WebSocketLiveServerMixin",
    "WebSocketLiveServerTestCase",
    "WebSocketLiveServerThread",
    "WebSocketTestClient",
    "capture_publishes",
]


# --------------------------------------------------------------------------- publish()


#: One ``publish()`` call seen by :func:`capture_publishes`: facility, message,
#: broadcast, users, groups, sessions (names and keys), history, channels.
CapturedPublish = publishing.PublishCall


@contextlib.contextmanager
def capture_publishes() -> Iterator[list[CapturedPublish]]:
    """Record ``django_ws.publish()`` calls instead of sending them to Redis.

    Arguments are checked exactly as for real (bad facility, no audience or an
    unserialisable message still raise); each call returns made-up offsets.
    """
    captured: list[CapturedPublish] = []
    offsets = itertools.count(1)

    def record(call: publishing.PublishCall) -> list[Published]:
        captured.append(call)
        return [Published(c, next(offsets), "captured", 0) for c in call.channels]

    with publishing.intercept(record):
        yield captured


# --------------------------------------------------------------------------- client


class WebSocketTestClient:
    """A blocking websocket client for tests (needs the ``websocket-client`` package).

    Args:
        url: the full ``ws://`` URL, query string included.
        session_key: a session to send as the session cookie.
        timeout: seconds to wait for each frame.
    """

    def __init__(self, url: str, *, session_key: str | None = None, timeout: float = 5.0) -> None:
        try:
            import websocket
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError(
                "WebSocketTestClient needs websocket-client: pip install 'django-uwsgi-ws[django]'"
            ) from None
        from django.conf import settings

        cookie = f"{settings.SESSION_COOKIE_NAME}={session_key}" if session_key else None
        self._websocket = websocket
        self.connection = websocket.create_connection(url, timeout=timeout, cookie=cookie)
        self.subscribed: dict[str, dict[str, Any]] = {}

    def receive(self) -> dict[str, Any]:
        """Return the next frame as a dict, heartbeats skipped; binary data as bytes."""
        while True:
            opcode, data = self.connection.recv_data()
            if opcode == self._websocket.ABNF.OPCODE_BINARY:
                header, payload = parse_binary_message(data)
                return {**header, "data": payload, "binary": True}
            frame = json.loads(data)
            if frame.get("type") == "subscribed":
                self.subscribed[frame["channel"]] = frame
            if frame.get("type") != "heartbeat":
                return frame

    def wait_ready(self) -> list[dict[str, Any]]:
        """Read up to the "ready" frame (all subscriptions active); return what came before."""
        frames = []
        while (frame := self.receive())["type"] != "ready":
            frames.append(frame)
        return frames

    def receive_message(self) -> Any:
        """Return the data of the next message, skipping control frames."""
        while (frame := self.receive())["type"] != "message":
            pass
        return frame["data"]

    def send(self, data: str | bytes) -> None:
        """Send a text (str) or binary (bytes) message."""
        if isinstance(data, bytes):
            self.connection.send(data, opcode=self._websocket.ABNF.OPCODE_BINARY)
        else:
            self.connection.send(data)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> WebSocketTestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def session_for(user: Any) -> str:
    """Log ``user`` in (without a password) and return the session key."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    from django.conf import settings

    return client.cookies[settings.SESSION_COOKIE_NAME].value


# --------------------------------------------------------------------------- live server


class _QuietWebSocketRequestHandler(WebSocketRequestHandler, QuietWSGIRequestHandler):
    pass


class _LiveWebSocketServer(ThreadedWSGIServer):
    def __init__(self, address: Any, handler_class: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(address, _QuietWebSocketRequestHandler, *args, **kwargs)
        self._websocket_handler: WebSocketWSGIHandler | None = None

    def set_app(self, application: Any) -> None:
        self._websocket_handler = WebSocketWSGIHandler(application)
        super().set_app(self._websocket_handler)

    def server_close(self) -> None:
        super().server_close()
        if self._websocket_handler is not None:
            self._websocket_handler.close()


class WebSocketLiveServerThread(LiveServerThread):
    """Django's live server thread, serving websockets too (one thread each)."""

    def _create_server(self, connections_override: Any = None) -> ThreadedWSGIServer:
        return _LiveWebSocketServer(
            (self.host, self.port),
            _QuietWebSocketRequestHandler,
            allow_reuse_address=False,
            connections_override=connections_override,
        )


class WebSocketLiveServerMixin:
    """Mix into a ``LiveServerTestCase`` to serve and open websockets in tests."""

    server_thread_class = WebSocketLiveServerThread
    live_server_url: str

    def websocket(
        self, facility: str, query: str = "subscribe-broadcast", *, user: Any = None, session_key: str | None = None
    ) -> WebSocketTestClient:
        """Open a websocket to ``facility`` as ``user`` (or with ``session_key``), ready to receive."""
        from .conf import get_settings

        if user is not None:
            session_key = session_for(user)
        url = self.live_server_url.replace("http://", "ws://", 1) + get_settings().url + facility + "?" + query
        client = WebSocketTestClient(url, session_key=session_key)
        client.wait_ready()
        return client


class WebSocketLiveServerTestCase(WebSocketLiveServerMixin, LiveServerTestCase):
    """A ``LiveServerTestCase`` whose live server serves websockets."""
