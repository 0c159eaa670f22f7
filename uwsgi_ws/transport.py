"""Byte transports under a websocket session.

A transport moves raw bytes; the websocket framing is the session's business. The
gevent transport works on the file descriptor uWSGI hands over after the handshake,
in non-blocking mode: writes never block the caller (the Hub calls them for every
subscriber), and what the kernel does not take at once waits in a bounded queue
that a write watcher drains.
"""

from __future__ import annotations

import _socket
import collections
import os
import socket
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gevent.event import Event


class Transport(Protocol):
    """What a session needs from the connection under it."""

    closed: bool
    # True when every method returns without switching to another greenlet or
    # thread (one OS thread of greenlets): sessions then need no lock around sends.
    cooperative: bool

    def recv(self, timeout: float) -> bytes | None:
        """Return received bytes, b"" at end of stream, None after ``timeout`` seconds."""

    def send(self, data: bytes) -> None:
        """Queue ``data`` for sending without blocking."""

    @property
    def queued_bytes(self) -> int:
        """Bytes accepted by ``send`` and not yet written to the socket."""

    @property
    def queued_messages(self) -> int:
        """Chunks accepted by ``send`` and not yet fully written."""

    def discard_queued(self) -> None:
        """Drop every queued chunk that has not started to be written."""

    def interrupt(self) -> None:
        """Make a pending ``recv`` return None now (from another greenlet or callback)."""

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued is written; False on timeout or error."""

    def cooperate(self, delay: float = 0.0) -> None:
        """Let the other connections of this worker run (between batches of work).

        With ``delay``, this connection goes on no sooner than ``delay`` seconds later
        (a client over its frame rate waits; see uwsgi_ws.session.FRAME_RATE).
        """

    def linger(self, timeout: float) -> None:
        """Half-close, then read and drop what the client still sends, for at most
        ``timeout`` seconds or until it closes too.

        Closing a socket with unread data makes the kernel reset the connection,
        and a reset can destroy the close frame still on its way to the client.
        """

    def close(self) -> None:
        """Stop using the connection."""


class _SendQueue:
    """Bookkeeping of the bytes a transport accepted and has not written yet, and what
    both socket transports do alike on top of their ``_sock`` and ``recv``."""

    _sock: _socket.socket  # socket.socket is a subclass
    closed: bool

    def recv(self, timeout: float) -> bytes | None:
        raise NotImplementedError

    def linger(self, timeout: float) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            data = self.recv(left)
            if not data:  # the client closed too (b""), or time is up (None)
                return

    def __init__(self) -> None:
        self._queue: collections.deque[memoryview] = collections.deque()
        self._queued = 0
        self._head_started = False  # the first chunk is partly written: it must be finished

    @property
    def queued_bytes(self) -> int:
        return self._queued

    @property
    def queued_messages(self) -> int:
        return len(self._queue)

    def _enqueue(self, data: bytes | memoryview) -> None:
        self._queue.append(memoryview(data))
        self._queued += len(data)

    def _wrote(self, sent: int) -> None:
        """Account for ``sent`` bytes of the first chunk written."""
        self._queued -= sent
        chunk = self._queue[0]
        if sent < len(chunk):
            self._queue[0] = chunk[sent:]
            self._head_started = True
        else:
            self._queue.popleft()
            self._head_started = False

    def _drop_queue(self) -> None:
        self._queue.clear()
        self._queued = 0

    def _discard_unstarted(self) -> None:
        keep = 1 if self._head_started and self._queue else 0
        while len(self._queue) > keep:
            self._queued -= len(self._queue.pop())


class GeventSocketTransport(_SendQueue):
    """A non-blocking transport over a socket file descriptor, for gevent.

    The socket is the C-level ``_socket.socket``, not gevent's cooperative wrapper:
    every call here is non-blocking anyway, and sends to thousands of sockets per
    broadcast skip a Python layer each.

    Args:
        fd: the connected socket's file descriptor.
        owns_fd: close the descriptor in ``close()``; uWSGI closes its own, so the
            websocket application leaves it open.
    """

    cooperative = True

    def __init__(self, fd: int, *, owns_fd: bool = False) -> None:
        # gevent is imported here, not with the module: the development server and
        # django_ws.testing use the threaded transport, and run without gevent.
        import gevent
        from gevent.event import Event

        self._sleep = gevent.sleep
        self._new_event = Event
        self._sock = _socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._owns_fd = owns_fd
        loop = gevent.get_hub().loop
        self._read_watcher = loop.io(fd, 1)
        self._write_watcher = loop.io(fd, 2)
        super().__init__()
        self._drained: Event | None = None
        self.closed = False
        self._released = False
        # Set by the read watcher or by interrupt(); recv() waits on it.
        self._wakeup = self._new_event()
        self._interrupted = False

    def recv(self, timeout: float) -> bytes | None:
        while not self.closed:
            try:
                return self._sock.recv(65536)
            except BlockingIOError:
                pass
            except OSError:
                self.closed = True
                return b""
            if self._interrupted:
                self._interrupted = False
                return None
            self._wakeup.clear()
            self._read_watcher.start(self._wakeup.set)
            try:
                woken = self._wakeup.wait(timeout)
            finally:
                self._read_watcher.stop()
            if not woken or self._interrupted:
                self._interrupted = False
                return None
        return b""

    def interrupt(self) -> None:
        self._interrupted = True
        self._wakeup.set()

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if self._queue:
            self._enqueue(data)
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._fail()
            return
        if sent < len(data):
            self._enqueue(memoryview(data)[sent:])
            self._head_started = sent > 0
            self._write_watcher.start(self._on_writable)

    def _on_writable(self) -> None:
        # Runs as a loop callback in the gevent hub: only non-blocking calls here.
        while self._queue:
            try:
                sent = self._sock.send(self._queue[0])
            except BlockingIOError:
                return
            except OSError:
                self._fail()
                return
            self._wrote(sent)
            if self._head_started:
                return  # the kernel took part of it: wait until writable again
        self._write_watcher.stop()
        if self._drained is not None:
            self._drained.set()

    def discard_queued(self) -> None:
        self._discard_unstarted()

    def cooperate(self, delay: float = 0.0) -> None:
        # sleep(0) runs the other ready greenlets; gevent bounds such a turn of the
        # loop (getswitchinterval, 5 ms), after which it polls for I/O again.
        self._sleep(delay)

    def drain(self, timeout: float) -> bool:
        if not self._queue:
            return not self.closed
        self._drained = self._new_event()
        self._drained.wait(timeout)
        return not self._queue and not self.closed

    def _fail(self) -> None:
        self.closed = True
        self._drop_queue()
        self._write_watcher.stop()
        # A broken socket also reads as ready, so the session's recv() notices.
        if self._drained is not None:
            self._drained.set()

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        self.closed = True
        self._write_watcher.stop()
        self._read_watcher.close()
        self._write_watcher.close()
        if self._owns_fd:
            self._sock.close()
        else:
            self._sock.detach()


class ThreadedSocketTransport(_SendQueue):
    """A transport for servers with one thread per connection (the development server).

    Reads happen in the session's thread, waiting with a selector on the socket and
    on a wake-up pipe (so ``interrupt`` works); writes are queued without blocking
    and a writer thread sends them, so a slow client never blocks the Hub.

    Args:
        sock: the connected socket; it stays owned by the server, which closes it.
    """

    cooperative = False

    def __init__(self, sock: socket.socket) -> None:
        import selectors
        import threading

        self._sock = sock
        sock.setblocking(True)
        super().__init__()
        self._cond = threading.Condition()
        self._interrupted = False
        self.closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._writer = threading.Thread(target=self._write_forever, name="django_ws-writer", daemon=True)
        self._writer.start()

    def recv(self, timeout: float) -> bytes | None:
        if self.closed:
            return b""
        ready = {key.fileobj for key, _ in self._selector.select(timeout)}
        if self._wake_r in ready:
            os.read(self._wake_r, 512)
        if self._interrupted:
            self._interrupted = False
            return None
        if self._sock not in ready:
            return None
        try:
            data = self._sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.closed = True
        return data

    def interrupt(self) -> None:
        self._interrupted = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # pipe full or closed: a wake-up is pending anyway
            pass

    def send(self, data: bytes) -> None:
        with self._cond:
            if self.closed:
                return
            self._enqueue(data)
            self._cond.notify()

    def _write_forever(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self.closed:
                    self._cond.wait()
                if self.closed:
                    return
                chunk = self._queue[0]
                # Once handed to send() part of it may reach the client: from now on
                # discard_queued() must keep it (and _wrote() account for it).
                self._head_started = True
            try:
                sent = self._sock.send(chunk)
            except OSError:
                with self._cond:
                    self.closed = True
                    self._drop_queue()
                    self._cond.notify_all()
                self.interrupt()
                return
            with self._cond:
                self._wrote(sent)
                if not self._queue:
                    self._cond.notify_all()

    def discard_queued(self) -> None:
        with self._cond:
            self._discard_unstarted()

    def cooperate(self, delay: float = 0.0) -> None:
        time.sleep(delay)  # each connection has its own thread: just let the others run

    def drain(self, timeout: float) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: not self._queue or self.closed, timeout)
            return not self._queue and not self.closed

    def close(self) -> None:
        with self._cond:
            already = self.closed and self._wake_r < 0
            self.closed = True
            self._cond.notify_all()
        if already:
            return
        try:
            # Unblocks the writer if it is stuck sending to a client that stopped reading.
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._writer.join(5)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1
