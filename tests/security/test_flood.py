"""Clients that flood or never read: others are not delayed, memory stays bounded.

The servers here beat every 2 seconds (``DJANGO_WS_HEARTBEAT``), so that a client
that stopped reading is found out within seconds rather than a minute.
"""

from __future__ import annotations

import time

import pytest
import websocket

import django_ws
from tests.conftest import WS, rss_kb, start_stack, stop, wait_for
from tests.security.hostile_clients import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Flood,
    RawWebSocket,
    client_frame,
    websocket_worker_pids,
)
from uwsgi_ws.protocol import Audience, Kind, channel_name, meta_key

HEARTBEAT = 2


@pytest.fixture(scope="module", params=["offload", "single", "runserver"])
def hostile_stack(request, project, tmp_path_factory):
    stack = start_stack(
        request.param, project, tmp_path_factory.mktemp(f"hostile-{request.param}"), DJANGO_WS_HEARTBEAT=str(HEARTBEAT)
    )
    yield stack
    for proc in stack.procs:
        stop(proc)


def _listeners(redis_server, facility: str) -> int:
    """Return how many websocket workers listen to ``facility``'s broadcast channel."""
    channel = channel_name("ws", facility, Audience(Kind.BROADCAST))
    return dict(redis_server.client().pubsub_numsub(channel)).get(channel.encode(), 0)


def _close_code(ws: WS, *, timeout: float = 30.0) -> tuple[list[dict], int]:
    """Read the frames up to the server's close frame; return them and its close code."""
    import json

    frames = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        opcode, data = ws.conn.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return frames, int.from_bytes(data[:2], "big")
        if opcode == websocket.ABNF.OPCODE_TEXT:
            frame = json.loads(data)
            if frame["type"] != "heartbeat":
                frames.append(frame)
    raise AssertionError(f"no close frame within {timeout}s; frames received: {frames[:5]}... ({len(frames)})")


# --------------------------------------------------------------------------- floods of tiny frames


@pytest.mark.timeout(180)
def test_a_flood_of_tiny_frames_does_not_delay_another_clients_broadcast(hostile_stack, project, facility):
    """The flooder's frames are read in bounded turns: the worker serves others in between.

    The flooder keeps sending (unsolicited pongs, which need no answer) until the
    other client has its message, so the message has to get through while the
    server is still reading the flood (which it now does at FRAME_RATE: the rest
    waits in the socket buffers). Under Django's development server every connection
    has its own thread, which is not what this tests.
    """
    if hostile_stack.mode == "runserver":
        pytest.skip("one thread per connection: the operating system shares the CPU between them")
    other = WS(hostile_stack.url(f"/ws/{facility}?subscribe-broadcast"), timeout=120)
    other.ready()
    flooder = RawWebSocket(hostile_stack, f"/ws/{facility}?publish-broadcast", session=project.cookie("alice"))
    flooder.read_until_ready()
    tiny = client_frame(OP_PONG) * 10922  # 65,532 bytes of 6-byte frames
    flood = Flood(flooder, tiny, max_bytes=200 << 20, max_seconds=30, stall_timeout=60)
    flood.start()
    try:
        # Once a write has to wait, the server is reading the flood at its own pace.
        wait_for(lambda: flood.slowed.is_set() and flood.sent > 1 << 20, timeout=30, what="the flood under way")
        started = time.monotonic()
        django_ws.publish(facility, "during the flood", broadcast=True)
        first = other.next()
        delay = time.monotonic() - started
        still_flooding = flood.is_alive() and not flood.ended
        sent_by_then = flood.sent
    finally:
        flood.stop_now.set()
        flood.join(70)
    print(
        f"\n{hostile_stack.mode}: broadcast delivered after {delay * 1000:.0f} ms beside a flood of "
        f"{sent_by_then / 6:,.0f} tiny frames sent so far (flood ended: {flood.ended!r})"
    )
    assert first["data"] == "during the flood"
    assert still_flooding, "the flood ended before the broadcast got through"
    assert delay < 5.0
    other.close()
    flooder.close()


def test_a_flood_is_read_at_the_frame_pace(hostile_stack, facility):
    """Frames are read at most 1,000 a second after a burst of 1,000 (FRAME_RATE).

    5,000 tiny frames, then a ping: its pong cannot come back before the 4,000 frames
    beyond the burst were read at that pace (4 s; asserted: at least 3 s). A lower
    bound, so a loaded machine cannot make it fail. Every server reads this way.
    """
    client = RawWebSocket(hostile_stack, f"/ws/{facility}?subscribe-broadcast")
    client.read_until_ready()
    started = time.monotonic()
    client.sock.sendall(client_frame(OP_PONG) * 5000 + client_frame(OP_PING, b"behind the flood"))
    while True:
        opcode, payload = client.read_frame()
        if opcode == OP_PONG and payload == b"behind the flood":
            break
    elapsed = time.monotonic() - started
    print(f"\n{hostile_stack.mode}: 5,001 frames read in {elapsed:.2f} s")
    assert elapsed >= 3.0
    client.close()


# --------------------------------------------------------------------------- clients that never read


@pytest.mark.timeout(300)
def test_clients_that_send_but_never_read_are_closed_and_memory_stays_bounded(
    hostile_stack, project, redis_server, facility
):
    """Pongs and error frames count against the send queue: no unbounded growth.

    One client pings, the other sends messages it may not publish; neither reads
    what the server answers. Each keeps sending until the server closes its
    connection, and must be closed while it is still sending (a client whose flood
    ended is closed later as silent, which proves nothing here); the websocket
    worker's RSS does not grow by more
    than 20 MB on the way. 24 MB of frames each is more than the kernel's socket
    buffers take in (about 4 MB each way on loopback). The server reads the pings
    at FRAME_RATE (1000 a second), so its answers fill those buffers in about 30 s
    before the send queue grows: the test takes that long.

    Behind the front instance (offload) the client's socket is the front's: its
    relay stops reading from a client it cannot write to, so the websocket worker
    never sees such a flood (measured before and after this defence: its RSS stays
    flat, and the client's writes block). This applies where the server holds the
    client's socket itself.
    """
    if hostile_stack.mode == "offload":
        pytest.skip("the front's offload relay stops reading from a client it cannot write to")
    pids = websocket_worker_pids(hostile_stack)
    pinger_facility, sender_facility = f"{facility}-ping", f"{facility}-send"
    pinger = RawWebSocket(hostile_stack, f"/ws/{pinger_facility}?subscribe-broadcast", rcvbuf=4096)
    sender = RawWebSocket(hostile_stack, f"/ws/{sender_facility}?subscribe-broadcast", rcvbuf=4096)
    for client in (pinger, sender):
        client.read_until_ready()
    assert _listeners(redis_server, pinger_facility) == 1 and _listeners(redis_server, sender_facility) == 1
    before = peak = rss_kb(pids)
    payload = b"p" * 125  # the largest control frame: its answer is as large
    floods = [
        Flood(pinger, client_frame(OP_PING, payload) * 500, max_bytes=24 << 20, max_seconds=120, stall_timeout=40),
        Flood(sender, client_frame(OP_TEXT, payload) * 500, max_bytes=24 << 20, max_seconds=120, stall_timeout=40),
    ]
    for flood in floods:
        flood.start()

    # How each flood stood when the server was seen to have closed its connection.
    at_close: dict[int, str] = {}

    def closed() -> bool:
        nonlocal peak
        peak = max(peak, rss_kb(pids))
        for i, flood_facility in enumerate((pinger_facility, sender_facility)):
            if i not in at_close and _listeners(redis_server, flood_facility) == 0:
                at_close[i] = floods[i].ended or "still sending"
        return len(at_close) == 2

    try:
        wait_for(closed, timeout=150, what="both hostile clients closed")
        were_closed = True
    except TimeoutError:
        were_closed = False
    for flood in floods:
        flood.stop_now.set()
        flood.join(45)
    peak = max(peak, rss_kb(pids))
    print(
        f"\n{hostile_stack.mode}: sent {floods[0].sent:,} bytes of pings ({floods[0].ended}) and "
        f"{floods[1].sent:,} bytes of refused messages ({floods[1].ended}); worker RSS {before:,} kB, "
        f"peak {peak:,} kB (+{(peak - before) / 1024:.1f} MB); closed: {were_closed}; at the close: {at_close}"
    )
    assert peak - before < 20 * 1024
    assert were_closed
    # Closed by the server while they were sending (not once silent after their flood).
    assert set(at_close.values()) <= {"still sending", "connection closed"}, at_close
    pinger.close()
    sender.close()


# --------------------------------------------------------------------------- refusals


def test_a_client_that_may_not_publish_is_closed_with_1008_at_its_sixth_message(hostile_stack, facility):
    """Five refused messages are answered (REFUSALS, one more every 10 s); the next closes."""
    ws = WS(hostile_stack.url(f"/ws/{facility}?subscribe-broadcast"))
    ws.ready()
    # One write: the server reads them together, as a flood would arrive.
    ws.conn.sock.sendall(b"".join(client_frame(OP_TEXT, b"attempt %d" % i) for i in range(20)))
    frames, code = _close_code(ws)
    assert [(f["type"], f["code"]) for f in frames] == [("error", "forbidden")] * 5
    assert code == 1008


def test_a_client_that_keeps_hitting_the_rate_limit_is_closed_with_1008(
    hostile_stack, project, redis_server, facility
):
    """RATE_LIMIT (10/s, bursts of 20) drops what exceeds it; five drops are answered, the next closes."""
    ws = WS(hostile_stack.url(f"/ws/{facility}?publish-broadcast"), session=project.cookie("alice"))
    ws.ready()
    ws.conn.sock.sendall(b"".join(client_frame(OP_TEXT, b"burst %d" % i) for i in range(60)))
    frames, code = _close_code(ws)
    assert [(f["type"], f["code"]) for f in frames] == [("error", "rate_limited")] * 5
    assert code == 1008
    channel = channel_name("ws", facility, Audience(Kind.BROADCAST))

    def published() -> int:
        return int(redis_server.client().hget(meta_key(channel), "offset") or 0)

    # The accepted messages are published after their batch was read (the close frame
    # may arrive first): the burst goes out, and nothing refused after it.
    wait_for(lambda: published() >= 20, timeout=10, what="the burst published")
    assert published() < 26


def test_pings_from_a_reading_client_are_still_answered(hostile_stack, facility):
    """The bounds do not stop a client that reads from pinging: every ping gets its pong."""
    client = RawWebSocket(hostile_stack, f"/ws/{facility}?subscribe-broadcast")
    client.read_until_ready()
    client.sock.sendall(b"".join(client_frame(OP_PING, b"%d" % i) for i in range(2000)))
    pongs = []
    while len(pongs) < 2000:
        opcode, payload = client.read_frame()
        assert opcode != OP_CLOSE
        if opcode == OP_PONG:
            pongs.append(payload)
    assert pongs == [b"%d" % i for i in range(2000)]
    client.close()
