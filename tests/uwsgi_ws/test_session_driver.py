"""The session driver and the threaded transport, without a server.

The driver test uses a transport that writes nothing until the session waits for it
(``drain``): the worst case of a writer that lags, which a loaded machine produces at
random. The transport test uses a real socket pair.
"""

from __future__ import annotations

import select
import socket
import threading

from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Ping, Pong

from uwsgi_ws.core import CLOSE_SLOW_CONSUMER
from uwsgi_ws.protocol import Limits, Ticket
from uwsgi_ws.session import Session
from uwsgi_ws.transport import ThreadedSocketTransport

PINGS = 2000


class LaggingTransport:
    """Accepts sends into a queue; the client reads them only when the server drains."""

    cooperative = False

    def __init__(self, incoming: bytes) -> None:
        self._incoming = incoming
        self.queue: list[bytes] = []
        self.written = bytearray()
        self.closed = False
        self._interrupted = False

    @property
    def queued_bytes(self) -> int:
        return sum(map(len, self.queue))

    @property
    def queued_messages(self) -> int:
        return len(self.queue)

    def recv(self, timeout: float) -> bytes | None:
        if self._interrupted:
            self._interrupted = False
            return None
        if self._incoming:
            data, self._incoming = self._incoming, b""
            return data
        return b""  # the client has sent everything and closes

    def send(self, data: bytes) -> None:
        self.queue.append(bytes(data))

    def drain(self, timeout: float) -> bool:
        for chunk in self.queue:
            self.written += chunk
        self.queue.clear()
        return True

    def discard_queued(self) -> None:
        self.queue.clear()

    def interrupt(self) -> None:
        self._interrupted = True

    def cooperate(self, delay: float = 0.0) -> None:
        pass

    def linger(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        self.drain(0)
        self.closed = True


def client_events(data: bytes) -> list[object]:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(bytes(data))
    return list(client.events())


def test_a_burst_of_pings_read_at_once_waits_for_the_writer():
    """2,000 pings arrive in one read while the writer lags: the session stops handling
    them at the read pause instead of queueing 2,000 pongs and cutting a client that
    reads (this was the case: 4008 after the 1,001st pong)."""
    client = Connection(ConnectionType.CLIENT)
    burst = b"".join(client.send(Ping(b"%d" % i)) for i in range(PINGS))
    ticket = Ticket(subscribe={}, limits=Limits(), expires=1e12)
    transport = LaggingTransport(burst)
    Session(ticket, transport, hub=None, store=None).run()  # type: ignore[arg-type]
    events = client_events(transport.written)
    closes = [e.code for e in events if isinstance(e, CloseConnection)]
    assert CLOSE_SLOW_CONSUMER not in closes
    assert [e.payload for e in events if isinstance(e, Pong)] == [b"%d" % i for i in range(PINGS)]


def test_a_chunk_being_written_survives_a_discard():
    """The writer thread has handed a chunk to send() and the kernel took part of it: a
    discard (slow-consumer cut) must keep that chunk whole and the close frame after
    it, or the client reads a torn frame followed by garbage."""
    ours, theirs = socket.socketpair()
    try:
        transport = ThreadedSocketTransport(ours)
        big = bytes(range(256)) * 16384  # 4 MiB: far more than the socket buffers hold
        transport.send(big)
        # Wait until the writer is inside send(): bytes readable, the chunk unfinished.
        assert select.select([theirs], [], [], 10)[0]
        assert transport.queued_bytes == len(big)
        transport.discard_queued()
        closing = b"\x88\x02\x0f\xa8"
        transport.send(closing)
        received = bytearray()
        reader = threading.Thread(target=lambda: received.extend(_read_all(theirs, len(big) + len(closing))))
        reader.start()
        assert transport.drain(30)
        reader.join(30)
        assert bytes(received) == big + closing
        assert transport.queued_bytes == 0
    finally:
        transport.close()
        ours.close()
        theirs.close()


def _read_all(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    sock.settimeout(30)
    while len(out) < n:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        out += chunk
    return bytes(out)
