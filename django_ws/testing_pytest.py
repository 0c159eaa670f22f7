"""pytest fixtures for projects using django_ws.

Enable them in a conftest.py with ``pytest_plugins = ["django_ws.testing_pytest"]``.
Django must be set up (pytest-django does it) and, for ``ws_live_server``, the test
must be allowed to use the database from another thread (with pytest-django: the
``transactional_db`` fixture).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .testing import CapturedPublish, WebSocketLiveServerThread, WebSocketTestClient, capture_publishes, session_for


@pytest.fixture
def ws_publishes() -> Iterator[list[CapturedPublish]]:
    """Record ``django_ws.publish()`` calls instead of sending them to Redis."""
    with capture_publishes() as captured:
        yield captured


class LiveServer:
    """A running live server that serves websockets; see :func:`ws_live_server`."""

    def __init__(self, thread: WebSocketLiveServerThread) -> None:
        self.thread = thread
        self.url = f"http://{thread.host}:{thread.port}"
        self._clients: list[WebSocketTestClient] = []

    def connect(
        self, facility: str, query: str = "subscribe-broadcast", *, user: Any = None, session_key: str | None = None
    ) -> WebSocketTestClient:
        """Open a websocket to ``facility`` as ``user``, ready to receive; closed after the test."""
        from .conf import get_settings

        if user is not None:
            session_key = session_for(user)
        url = f"ws://{self.thread.host}:{self.thread.port}{get_settings().url}{facility}?{query}"
        client = WebSocketTestClient(url, session_key=session_key)
        self._clients.append(client)
        client.wait_ready()
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.thread.terminate()


@pytest.fixture
def ws_live_server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """A live server on a free port that serves pages and websockets."""
    from django.db import connections

    try:
        request.getfixturevalue("transactional_db")  # pytest-django's, when installed
    except pytest.FixtureLookupError:
        pass
    overrides = {conn.alias: conn for conn in connections.all() if conn.vendor == "sqlite" and conn.is_in_memory_db()}
    thread = WebSocketLiveServerThread("127.0.0.1", _static_handler(), connections_override=overrides, port=0)
    thread.daemon = True
    thread.start()
    thread.is_ready.wait()
    if thread.error:
        raise thread.error
    server = LiveServer(thread)
    yield server
    server.close()


def _static_handler() -> Any:
    from django.apps import apps

    if apps.is_installed("django.contrib.staticfiles"):
        from django.contrib.staticfiles.handlers import StaticFilesHandler

        return StaticFilesHandler
    return lambda handler: handler
