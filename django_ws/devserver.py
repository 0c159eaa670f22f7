"""Websockets under ``manage.py runserver``: one thread per websocket, no uWSGI needed.

The development server hands websocket upgrades to Django like any request; the
middleware authorizes them and signs a ticket, and :class:`~django_ws.wsgi.WebSocketWSGIHandler`
then serves the websocket with the same application and session code as the
websocket instance of production. Only the handshake and the byte transport differ:
this module answers the handshake on the request's socket and gives the session a
:class:`~uwsgi_ws.transport.ThreadedSocketTransport`.
"""

from __future__ import annotations

import socket
from typing import Any

from django.core.servers.basehttp import ServerHandler, WSGIRequestHandler, WSGIServer

from uwsgi_ws.app import ACCEPT_KEY, ACCEPT_STREAM_KEY
from uwsgi_ws.protocol import accept_key
from uwsgi_ws.transport import ThreadedSocketTransport


class _ServerHandler(ServerHandler):
    def finish_response(self) -> None:
        if getattr(self.request_handler, "upgraded", False):
            # The websocket session has run and ended on this socket: nothing more
            # may be written to it, and the connection is over.
            self.request_handler.close_connection = True
            if hasattr(self.result, "close"):
                self.result.close()
            return
        super().finish_response()


class WebSocketRequestHandler(WSGIRequestHandler):
    """Django's development request handler, able to switch a request to websocket."""

    upgraded = False

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        if self.headers.get("Upgrade", "").lower() == "websocket":
            environ[ACCEPT_KEY] = self.accept_websocket
        elif "text/event-stream" in self.headers.get("Accept", ""):
            environ[ACCEPT_STREAM_KEY] = self.accept_stream
        return environ

    def accept_stream(self, headers: list[tuple[str, str]]) -> ThreadedSocketTransport:
        """Start an event stream with ``headers`` and return its transport."""
        self.upgraded = True
        head = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        self.connection.sendall(head.encode("latin-1") + b"retry: 2000\n\n")
        self.log_request(200)
        return ThreadedSocketTransport(self.connection)

    def accept_websocket(self, key: str) -> ThreadedSocketTransport:
        """Answer the handshake and return the transport of the websocket."""
        self.upgraded = True
        self.connection.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key).encode("ascii") + b"\r\n\r\n"
        )
        self.log_request(101)
        return ThreadedSocketTransport(self.connection)

    def handle_one_request(self) -> None:
        # As Django's, with a server handler that leaves upgraded sockets alone.
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = ""
            self.request_version = ""
            self.command = ""
            self.send_error(414)
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        handler = _ServerHandler(self.rfile, self.wfile, self.get_stderr(), self.get_environ())
        handler.request_handler = self
        handler.run(self.server.get_app())  # type: ignore[attr-defined]

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:  # the websocket transport shut the socket down already
            pass


class WebSocketDevServer(WSGIServer):
    """Django's development server with :class:`WebSocketRequestHandler`."""

    def __init__(self, address: Any, handler_class: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(address, WebSocketRequestHandler, *args, **kwargs)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A websocket client that vanished is routine, not an error worth a traceback.
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            return
        super().handle_error(request, client_address)
