"""Slow clients (slowloris) must not starve the front's Django threads.

uWSGI's ``http-socket`` reads a request with a blocking worker thread, and its
``socket-timeout`` (4 s) only bounds the pause between two reads: a client that sends
one header line every two seconds holds a thread for as long as it likes, and a few
such clients leave none for pages. The deployment that docs/howto/deploy.md recommends puts nginx in
front: nginx reads each request in full (head and body) before it passes it on, and
cuts a head that takes longer than ``client_header_timeout``, so the front only ever
sees complete requests.

The attack, for each target: 50 connections dribbling header lines, 50 dribbling a
request body and 50 dribbling a websocket handshake, while a client fetches pages and
opens websockets. Through the deployment guide's nginx every page and websocket must be answered
within ``PAGE_TIMEOUT`` and no front thread may be held. The same test against the
front's own port, and against an nginx that streams request bodies
(``proxy_request_buffering off``), is the unprotected baseline: it must fail with
``Starved`` (strict xfail), which shows the test can tell the difference.

``bench/slow_clients.py`` reuses these helpers to print figures (page times with 0, 3,
50 slow connections, with uWSGI's own options) for docs/howto/deploy.md.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import django_ws
from tests.conftest import WS, Project, Stack, free_port, start_stack, stop, wait_for
from tests.test_nginx import readme_server, running_nginx

INTERVAL = 2.0  # seconds between two pieces of a slow request: the reported attack
COUNT = 50  # slow connections of each kind
PAGE_TIMEOUT = 10.0  # generous: a page takes milliseconds; on a starved front it never comes
# How long pages are fetched during the attack: several INTERVALs, and longer than
# uWSGI's own socket-timeout (4 s), so a slow connection the front was going to drop
# by itself has been dropped.
PROBE_SECONDS = 12.0
PROBE_PACE = 0.25  # seconds between two probe rounds (page + websocket)
IDLE_TIMEOUT = 5.0  # a thread that has answered is free in milliseconds; a held one never is
BODY_LENGTH = 65536  # announced body size: under nginx's client_max_body_size (1m)
KINDS = ("header", "body", "handshake")


class Starved(AssertionError):
    """The front did not answer in time, or its threads were held by slow connections."""


# --------------------------------------------------------------------------- slow clients


def request_start(kind: str, host: str, facility: str) -> bytes:
    """Return the first bytes a slow client of ``kind`` sends when it connects."""
    if kind == "header":
        return f"GET / HTTP/1.1\r\nHost: {host}\r\n".encode()
    if kind == "handshake":
        return (
            f"GET /ws/{facility}?subscribe-broadcast HTTP/1.1\r\nHost: {host}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        ).encode()
    if kind == "body":
        # A well-formed CSRF cookie (any 32 letters or digits will do) makes Django's
        # CSRF middleware read the POST body, so on an unprotected front the slow body
        # holds the Django thread itself, not only uWSGI's.
        return (
            f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {BODY_LENGTH}\r\nCookie: csrftoken={secrets.token_hex(16)}\r\n\r\na="
        ).encode()
    raise ValueError(f"unknown kind of slow client {kind!r}: expected one of {KINDS}")


def request_piece(kind: str, n: int) -> bytes:
    """Return the ``n``-th piece a slow client sends: a header line, or a byte of its body."""
    return b"a" if kind == "body" else f"X-Slow-{n}: {n}\r\n".encode()


@dataclass
class SlowConnection:
    kind: str
    sock: socket.socket
    opened: float
    answer: bytes = b""
    closed_after: float | None = None  # seconds from connecting until the server closed it

    @property
    def status(self) -> int | None:
        """The HTTP status the server answered before it closed, if any."""
        match = re.match(rb"HTTP/1\.[01] (\d{3})", self.answer)
        return int(match.group(1)) if match else None


@dataclass
class SlowClients:
    """Connections that each send their request a little at a time and never finish it.

    One thread drives them all: every ``interval`` it sends each open connection one
    more piece (a header line, or one byte of the body), and in between it reads what
    the server sends; a connection the server closes is recorded with how long it
    lasted, and with ``reconnect`` replaced by a new one, as a real attacker would.
    Everything stops, and every socket is closed, when the block ends.
    """

    port: int
    counts: dict[str, int]
    facility: str
    interval: float = INTERVAL
    host: str = "127.0.0.1"
    reconnect: bool = False
    connections: list[SlowConnection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)

    def __enter__(self) -> SlowClients:
        try:
            for kind, count in self.counts.items():
                for _ in range(count):
                    self._open(kind)
        except BaseException:
            self._close_all()
            raise
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._close_all()

    def _close_all(self) -> None:
        for conn in self.connections:
            conn.sock.close()
        self._selector.close()

    def of(self, kind: str) -> list[SlowConnection]:
        return [c for c in self.connections if c.kind == kind]

    def _open(self, kind: str) -> None:
        # connect() completes in the kernel's listen queue even when the server
        # accepts nothing: this never waits on the server.
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(request_start(kind, self.host, self.facility))
        sock.setblocking(False)
        conn = SlowConnection(kind, sock, time.monotonic())
        self.connections.append(conn)
        self._selector.register(sock, selectors.EVENT_READ, conn)

    def _closed(self, conn: SlowConnection) -> None:
        conn.closed_after = time.monotonic() - conn.opened
        self._selector.unregister(conn.sock)
        conn.sock.close()
        if self.reconnect and not self._stop.is_set():
            self._open(conn.kind)

    def _read(self, conn: SlowConnection) -> None:
        try:
            data = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:  # reset by the server
            data = b""
        if data:
            conn.answer = (conn.answer + data)[:4096]
        else:
            self._closed(conn)

    def _run(self) -> None:
        next_piece = time.monotonic() + self.interval
        n = 0
        while not self._stop.is_set():
            # Short waits so that the end of the block is noticed at once.
            wait = min(0.2, max(0.0, next_piece - time.monotonic()))
            for key, _ in self._selector.select(timeout=wait):
                self._read(key.data)
            if time.monotonic() < next_piece:
                continue
            n += 1
            for conn in list(self.connections):
                if conn.closed_after is not None:
                    continue
                try:
                    conn.sock.send(request_piece(conn.kind, n))
                except BlockingIOError:
                    pass  # the server reads nothing: a full buffer is a stalled request too
                except OSError:
                    self._closed(conn)
            next_piece += self.interval


# --------------------------------------------------------------------------- the front


def listening_ports(pid: int) -> set[int]:
    """Return the loopback TCP ports process ``pid`` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass
class Front:
    """The front as uwsgi.ini.example runs it, with uWSGI's stats server to watch its threads."""

    stack: Stack
    stats_port: int

    @property
    def port(self) -> int:
        return self.stack.port

    def _stats(self) -> dict:
        with socket.create_connection(("127.0.0.1", self.stats_port), timeout=5) as s:
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return json.loads(b"".join(chunks))

    def busy_threads(self) -> int:
        """Count the front's worker threads inside a request (reading one included).

        uWSGI marks a thread ``in_request`` from the moment it accepts a connection, so a
        slow client it is still reading counts.
        """
        return sum(core["in_request"] for worker in self._stats()["workers"] for core in worker["cores"])

    def threads(self) -> int:
        return sum(len(worker["cores"]) for worker in self._stats()["workers"])


def start_front(project: Project, tmp: Path, **extra: str) -> Front:
    """Start the offload stack with the ini's front of 2 processes x 2 threads and a stats server.

    The stats server is given as an environment option, which the websocket instance
    inherits: on port 0 each instance gets a port of its own, and the front's is found
    among the ports its master listens on.
    """
    env = {
        # uwsgi.ini.example's defaults (start_stack makes a 1 x 1 front for the other tests)
        "DJANGO_WS_PROCESSES": "2",
        "DJANGO_WS_THREADS": "2",
        "UWSGI_STATS": "127.0.0.1:0",
        **extra,
    }
    stack = start_stack("offload", project, tmp, **env)
    master = stack.procs[0].pid
    ports = wait_for(lambda: listening_ports(master) - {stack.port}, what="the front's stats server")
    assert len(ports) == 1, ports
    return Front(stack, ports.pop())


def stop_front(front: Front) -> None:
    for proc in front.stack.procs:
        stop(proc)


# --------------------------------------------------------------------------- the probes


def fetch_page(port: int, timeout: float = PAGE_TIMEOUT) -> float:
    """GET the example's home page; return the seconds it took, or raise Starved."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
    except TimeoutError:
        raise Starved(f"no page within {timeout:.0f} s") from None
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    assert response.status == 200, response.status
    if elapsed > timeout:
        raise Starved(f"a page took {elapsed:.1f} s")
    return elapsed


def websocket_roundtrip(port: int, facility: str, n: int) -> float:
    """Open a websocket, receive a message published to it; return the seconds it took."""
    import websocket

    started = time.monotonic()
    url = f"ws://127.0.0.1:{port}/ws/{facility}?subscribe-broadcast"
    try:
        ws = WS(url, origin=f"http://127.0.0.1:{port}", timeout=PAGE_TIMEOUT)
        ws.ready()
    except (TimeoutError, websocket.WebSocketTimeoutException):
        raise Starved(f"no websocket within {PAGE_TIMEOUT:.0f} s") from None
    try:
        django_ws.publish(facility, f"probe {n}", broadcast=True)
        assert ws.next()["data"] == f"probe {n}"
    finally:
        ws.close()
    elapsed = time.monotonic() - started
    if elapsed > PAGE_TIMEOUT:
        raise Starved(f"a websocket took {elapsed:.1f} s")
    return elapsed


@dataclass
class Probes:
    pages: list[float] = field(default_factory=list)
    websockets: list[float] = field(default_factory=list)
    idle_after: list[float] = field(default_factory=list)  # seconds until no front thread was in a request


def wait_idle(front: Front, timeout: float = IDLE_TIMEOUT) -> float:
    """Wait until no front thread is inside a request; return how long it took, or raise Starved.

    A thread that has just answered may take a moment to mark itself free (longer on a
    loaded machine); a thread held by a slow connection stays busy as long as it lasts.
    """
    started = time.monotonic()
    try:
        wait_for(lambda: front.busy_threads() == 0, timeout=timeout, what="an idle front")
    except TimeoutError:
        raise Starved(
            f"{front.busy_threads()} of the front's {front.threads()} threads still inside a request "
            f"{timeout:.0f} s after every answer"
        ) from None
    return time.monotonic() - started


def probe(front: Front, port: int, facility: str, seconds: float) -> Probes:
    """Fetch pages and open websockets through ``port`` for ``seconds``; raise Starved.

    After each round (a page, a websocket) the front must become idle: the round's own
    requests are answered, so a thread still inside a request belongs to someone else.
    """
    found = Probes()
    pace = threading.Event()  # never set: its wait() paces the rounds
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found.pages.append(fetch_page(port))
            found.websockets.append(websocket_roundtrip(port, facility, len(found.websockets)))
        except Starved as exc:
            busy = f"{front.busy_threads()} of the front's {front.threads()} threads in a request"
            raise Starved(f"{exc}: {busy}") from None
        found.idle_after.append(wait_idle(front))
        pace.wait(PROBE_PACE)
    return found


def nginx_seconds(server: str, directive: str) -> float:
    """Return a time directive of an nginx server block, in seconds (``10s``, ``1m``, ``30``)."""
    match = re.search(rf"^\s*{directive}\s+(\d+)(ms|s|m)?;", server, re.M)
    assert match, f"the deployment guide's nginx snippet does not set {directive}"
    value, unit = int(match.group(1)), match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60}[unit]


@contextlib.contextmanager
def target_port(front: Front, target: str, tmp_path: Path) -> Iterator[tuple[int, str]]:
    """Yield the port to attack and the nginx server block in front of it ("" for the front)."""
    if target == "front":
        yield front.port, ""
        return
    port = free_port()
    server = readme_server(front.port, port)
    if target == "nginx-unbuffered":
        assert "proxy_request_buffering on;" in server, "the deploy guide's snippet should buffer bodies"
        server = server.replace("proxy_request_buffering on;", "proxy_request_buffering off;")
    with running_nginx(server, port, tmp_path) as port:
        yield port, server


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def front(project, tmp_path_factory):
    front = start_front(project, tmp_path_factory.mktemp("slow-clients"))
    yield front
    stop_front(front)


BASELINE = "unprotected baseline: the slow connections hold the front's threads"


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "target",
    [
        "nginx",
        pytest.param("front", marks=pytest.mark.xfail(strict=True, raises=Starved, reason=BASELINE)),
        pytest.param("nginx-unbuffered", marks=pytest.mark.xfail(strict=True, raises=Starved, reason=BASELINE)),
    ],
)
def test_slow_clients_do_not_starve_the_front(front, target, facility, tmp_path):
    """150 slow connections through the README's nginx: pages and websockets still served."""
    # Whatever ran before (a baseline leaves the front busy for a moment): start idle.
    # A plain wait: a TimeoutError here is an error, never the Starved a baseline expects.
    wait_for(lambda: front.busy_threads() == 0, what="an idle front", timeout=30)
    with target_port(front, target, tmp_path) as (port, server):
        counts = dict.fromkeys(KINDS, COUNT)
        with SlowClients(port, counts, facility) as slow:
            found = probe(front, port, facility, PROBE_SECONDS)
            if not server:
                return  # the front itself: only the probes apply
            header_timeout = nginx_seconds(server, "client_header_timeout")
            heads = slow.of("header") + slow.of("handshake")
            # nginx cuts a request head that is not complete after client_header_timeout.
            wait_for(
                lambda: all(c.closed_after is not None for c in heads),
                what="nginx to cut the slow request heads",
                timeout=header_timeout + 15,
            )
            bodies = slow.of("body")
            pending = [c for c in bodies if c.closed_after is None]
            cut = [c.closed_after or 0.0 for c in heads]
            print(
                f"{target}: {len(found.pages)} pages (slowest {max(found.pages):.3f} s), "
                f"{len(found.websockets)} websockets (slowest {max(found.websockets):.3f} s), "
                f"front idle again within {max(found.idle_after):.3f} s after each; "
                f"{len(heads)} slow request heads cut after {min(cut):.1f}-{max(cut):.1f} s "
                f"(statuses {sorted({str(c.status) for c in heads})}); "
                f"{len(pending)} of {len(bodies)} slow bodies still pending"
            )
    for conn in heads:
        assert conn.closed_after is not None and conn.closed_after >= header_timeout - 1, conn
        assert conn.status in (None, 408), conn.answer[:100]
    for conn in bodies:
        # Never passed on: a slow body is either still being read by nginx or cut by it.
        assert conn.status in (None, 408), conn.answer[:100]
