"""Talk to the websocket instance directly, the way the front's offload thread does.

A hand-over is a uwsgi-protocol packet of request variables (the client's handshake
headers plus the ticket Django added) followed by the client's bytes.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from typing import Any


def new_key() -> str:
    """Return a fresh Sec-WebSocket-Key."""
    return base64.b64encode(os.urandom(16)).decode()


def uwsgi_packet(variables: dict[str, str]) -> bytes:
    body = b""
    for name, value in variables.items():
        n, v = name.encode(), value.encode()
        body += struct.pack("<H", len(n)) + n + struct.pack("<H", len(v)) + v
    return struct.pack("<BHB", 0, len(body), 0) + body


def handshake_vars(ticket: str | None, *, key: str, stream: bool = False) -> dict[str, str]:
    variables = {
        "REQUEST_METHOD": "GET",
        "REQUEST_URI": "/ws/direct?subscribe-broadcast",
        "PATH_INFO": "/ws/direct",
        "QUERY_STRING": "subscribe-broadcast",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1",
    }
    if stream:
        variables["HTTP_ACCEPT"] = "text/event-stream"
    else:
        variables.update(
            {
                "HTTP_UPGRADE": "websocket",
                "HTTP_CONNECTION": "Upgrade",
                "HTTP_SEC_WEBSOCKET_VERSION": "13",
                "HTTP_SEC_WEBSOCKET_KEY": key,
            }
        )
    if ticket is not None:
        variables["DJANGO_WS_TICKET"] = ticket
    return variables


def _connect(target: Any) -> socket.socket:
    """A connection to the websocket instance: of a stack (``ws_connect``), a TCP port or a unix path."""
    if hasattr(target, "ws_connect"):
        return target.ws_connect()  # type: ignore[no-any-return]
    if isinstance(target, int):
        return socket.create_connection(("127.0.0.1", target), timeout=10)
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(10)
    conn.connect(target)
    return conn


def _read_until(conn: socket.socket, end: bytes) -> bytes:
    data = b""
    while end not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def status_line(target: Any, variables: dict[str, str]) -> bytes:
    """Send one hand-over to the websocket instance; return the first line of its answer."""
    with _connect(target) as conn:
        conn.sendall(uwsgi_packet(variables))
        data = _read_until(conn, b"\r\n")
    return data.split(b"\r\n", 1)[0]


def open_direct(target: Any, variables: dict[str, str]) -> tuple[socket.socket, bytes]:
    """Hand a websocket over directly; return the socket and the bytes after the 101 answer."""
    conn = _connect(target)
    conn.sendall(uwsgi_packet(variables))
    head, _, rest = _read_until(conn, b"\r\n\r\n").partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        conn.close()
        raise AssertionError(f"handshake refused: {head[:100]!r}")
    return conn, rest


def read_until_close(conn: socket.socket, pending: bytes = b"") -> tuple[int | None, bytes]:
    """Read server frames (unmasked) until a close frame; return its code and reason.

    Returns (None, b"") if the connection ends without a close frame.
    """
    buffer = pending
    while True:
        while len(buffer) >= 2:
            opcode = buffer[0] & 0x0F
            length = buffer[1] & 0x7F
            offset = 2
            if length == 126:
                if len(buffer) < 4:
                    break
                (length,) = struct.unpack("!H", buffer[2:4])
                offset = 4
            elif length == 127:
                if len(buffer) < 10:
                    break
                (length,) = struct.unpack("!Q", buffer[2:10])
                offset = 10
            if len(buffer) < offset + length:
                break
            payload = buffer[offset : offset + length]
            buffer = buffer[offset + length :]
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return code, payload[2:]
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        buffer += chunk
