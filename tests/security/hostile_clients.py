"""Clients that misbehave on purpose, and ways to watch what they cost the server.

A hostile client speaks raw websocket frames on a plain socket: it can send any
bytes (thousands of frames per write) and read only when it chooses to, which no
well-behaved client library allows.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import threading
import time

from tests.conftest import Stack, cmdline, descendants, rss_kb

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """Return one masked client-to-server frame (payloads under 126 bytes)."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + masked


def websocket_worker_pids(stack: Stack) -> list[int]:
    """Return the processes that serve the websockets of ``stack`` (started by the suite)."""
    root = stack.procs[0].pid
    if stack.mode == "offload":
        return [pid for pid in descendants(root) if "uwsgi.ini.example:websocket" in cmdline(pid)]
    return [root, *descendants(root)]


class RawWebSocket:
    """A websocket client on a plain socket: it sends what it is given, reads when told.

    Args:
        stack: the server.
        path: the websocket URL's path and query.
        session: a session key for the Cookie header.
        rcvbuf: a small receive buffer (set before connecting, so the window stays small).
    """

    def __init__(self, stack: Stack, path: str, *, session: str | None = None, rcvbuf: int | None = None) -> None:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", stack.port))
        key = base64.b64encode(os.urandom(16)).decode()
        cookie = f"Cookie: sessionid={session}\r\n" if session else ""
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{stack.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{cookie}\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"handshake refused: {answer[:200]!r}")
            answer += chunk
        head, _, self._buffer = answer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {head[:200]!r}")
        self.sock = sock

    def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def read_frame(self) -> tuple[int, bytes]:
        """Return the next server frame as (opcode, payload)."""
        first, second = self._read_exactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read_exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read_exactly(8))
        return first & 0x0F, self._read_exactly(length)

    def read_until_ready(self) -> None:
        while True:
            opcode, payload = self.read_frame()
            if opcode == OP_TEXT and payload.startswith(b'{"type":"ready"'):
                return

    def close(self) -> None:
        self.sock.close()


class Flood(threading.Thread):
    """Send ``chunk`` (whole frames) over and over until told to stop or a bound is reached.

    It stops by itself after ``max_bytes`` or ``max_seconds``, when the server stops
    reading for ``stall_timeout`` seconds (its socket buffers are full), or when the
    connection breaks. ``sent`` counts the bytes the kernel took; ``slowed`` is set
    once a write had to wait, i.e. once the server reads the flood no faster than its
    own pace.
    """

    def __init__(
        self,
        client: RawWebSocket,
        chunk: bytes,
        *,
        max_bytes: int,
        max_seconds: float,
        stall_timeout: float = 5.0,
        last: bytes = b"",
    ) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.chunk = chunk
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.stall_timeout = stall_timeout
        self.last = last
        self.sent = 0
        self.ended = ""
        self.slowed = threading.Event()
        self.stop_now = threading.Event()

    def run(self) -> None:
        sock = self.client.sock
        # Short waits, so that a write the server makes wait is noticed while it waits.
        sock.settimeout(0.05)
        deadline = time.monotonic() + self.max_seconds
        try:
            while True:
                if self.stop_now.is_set():
                    self.ended = "stopped"
                    break
                if self.sent >= self.max_bytes or time.monotonic() > deadline:
                    self.ended = "bound reached"
                    break
                self._send_all(self.chunk)
            if self.last:
                self._send_all(self.last)
        except TimeoutError:
            self.ended = "server stopped reading"
        except OSError:
            self.ended = "connection closed"

    def _send_all(self, data: bytes) -> None:
        """Send every byte of ``data`` (whole frames); TimeoutError after ``stall_timeout`` without progress."""
        view = memoryview(data)
        last_progress = time.monotonic()
        while view:
            try:
                n = self.client.sock.send(view)
            except TimeoutError:
                self.slowed.set()
                if self.stop_now.is_set() and view.nbytes == len(data):
                    return  # nothing of this chunk sent yet: the stream stays whole
                if time.monotonic() - last_progress > self.stall_timeout:
                    raise
                continue
            view = view[n:]
            self.sent += n
            last_progress = time.monotonic()


class PeakRSS(threading.Thread):
    """Sample the RSS of ``pids`` every few milliseconds until stopped; keep the peak."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.before = self.peak = rss_kb(pids)
        self._stop_now = threading.Event()

    def run(self) -> None:
        while not self._stop_now.wait(0.005):
            self.peak = max(self.peak, rss_kb(self.pids))

    def __enter__(self) -> PeakRSS:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_now.set()
        self.join(5)
        self.peak = max(self.peak, rss_kb(self.pids))

    @property
    def growth_kb(self) -> int:
        return self.peak - self.before
