"""Hostile input at the front door: refused cleanly, others unaffected, resources freed."""

from __future__ import annotations

import base64
import os
import socket
import time

import pytest

import django_ws
from tests.conftest import WS


def raw_request(port: int, data: bytes, *, timeout: float = 15.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        try:
            conn.sendall(data)
        except OSError:
            pass
        chunks = []
        while True:
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
    return b"".join(chunks)


def handshake(path: str, extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{extra}\r\n"
    ).encode()


def status_of(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1."):
        return None  # closed without an answer
    return int(answer.split(b" ", 2)[1])


def assert_still_serving(stack, facility: str) -> None:
    ws = WS(stack.url(f"/ws/{facility}?subscribe-broadcast"))
    ws.ready()
    django_ws.publish(facility, "still serving", broadcast=True)
    assert ws.next()["data"] == "still serving"
    ws.close()


@pytest.mark.parametrize(
    "name,request_bytes,allowed",
    [
        ("long query", lambda f: handshake(f"/ws/{f}?subscribe-broadcast&" + "x" * 10000), {400}),
        ("huge query", lambda f: handshake(f"/ws/{f}?subscribe-broadcast&" + "x" * 40000), {None, 400, 414, 431}),
        ("huge header", lambda f: handshake(f"/ws/{f}?subscribe-broadcast", "Cookie: " + "c" * 40000 + "\r\n"),
         {None, 400, 431}),
        ("control characters", lambda f: handshake(f"/ws/{f}%00%0a?subscribe-broadcast"), {400}),
        ("non-ASCII facility", lambda f: handshake("/ws/caf%C3%A9?subscribe-broadcast"), {400}),
        ("dot-dot facility", lambda f: handshake("/ws/..%2Fadmin?subscribe-broadcast"), {400, 404}),
        ("no key", lambda f: handshake(f"/ws/{f}?subscribe-broadcast").replace(b"Sec-WebSocket-Key", b"X-Key"),
         {400}),
        ("not HTTP", lambda f: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)) + b"\r\n\r\n",
         {None, 400}),
    ],
)
def test_malformed_handshakes_are_refused_cleanly(stack, facility, name, request_bytes, allowed):
    if stack.mode == "runserver" and name == "huge header":
        allowed = allowed | {101}  # the development server takes header lines up to 64 KiB
    answer = raw_request(stack.port, request_bytes(facility))
    assert status_of(answer) in allowed, answer[:200]
    assert b"Traceback" not in answer
    assert_still_serving(stack, facility)


@pytest.mark.timeout(60)
def test_incomplete_handshakes_are_timed_out(offload_stack, facility):
    """Connections that never finish their request are closed by the server."""
    idle = []
    for _ in range(3):
        conn = socket.create_connection(("127.0.0.1", offload_stack.port), timeout=30)
        conn.sendall(b"GET /ws/" + facility.encode() + b"?subscribe-broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        idle.append(conn)
    started = time.monotonic()
    for conn in idle:
        try:
            answer = conn.recv(1024)  # TimeoutError after 30 s would fail the test
        except ConnectionResetError:
            answer = b""
        conn.close()
        assert answer == b"" or (status_of(answer) or 0) >= 400, answer[:100]
    elapsed = time.monotonic() - started
    print(f"3 incomplete handshakes freed after {elapsed:.1f}s")
    assert elapsed < 30
    assert_still_serving(offload_stack, facility)
