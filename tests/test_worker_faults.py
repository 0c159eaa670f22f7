"""A websocket worker dies: clients reconnect and recover, no Redis connection leaks."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.parse

import pytest
import websocket

import django_ws
from tests.conftest import WS, ancestors, cmdline, descendants, start_stack, stop, wait_for


def _connected(url: str, count: int, facility: str) -> tuple[list[WS], list[dict]]:
    """Open ``count`` websockets and return them with the position of a first message."""
    clients = [WS(url) for _ in range(count)]
    for ws in clients:
        ws.ready()
    django_ws.publish(facility, "before", broadcast=True)
    return clients, [ws.next() for ws in clients]


def _reconnect(url: str, position: dict) -> WS | None:
    """Reconnect from ``position``, or None while no worker listens yet."""
    query = urllib.parse.quote(json.dumps({"broadcast": [position["offset"], position["epoch"]]}))
    try:
        return WS(url + "&recover=" + query)
    except (OSError, websocket.WebSocketException):
        return None


@pytest.mark.timeout(120)
def test_killed_worker_clients_recover_and_nothing_leaks(project, redis_server, tmp_path, facility):
    stack = start_stack("offload", project, tmp_path)
    try:
        url = stack.url(f"/ws/{facility}?subscribe-broadcast")
        clients, positions = _connected(url, 20, facility)
        assert {p["data"] for p in positions} == {"before"}

        # The websocket worker names its Redis connections with its pid.
        def ws_workers() -> set[int]:
            return {pid for pid, counts in redis_server.worker_connections().items() if counts["hub"]}

        before_kill = ws_workers()
        [worker] = [pid for pid in before_kill if stack.procs[0].pid in ancestors(pid)]
        os.kill(worker, signal.SIGKILL)  # a worker of the stack this test started
        for ws in clients:
            with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
                while True:
                    ws.next()
        for i in range(5):
            django_ws.publish(facility, f"missed {i}", broadcast=True)

        again = [wait_for(lambda p=p: _reconnect(url, p), what="respawned worker") for p in positions]
        for ws in again:
            frames = ws.ready()
            assert [f["data"] for f in frames if f["type"] == "message"] == [f"missed {i}" for i in range(5)]
            assert frames[-1]["recovered"] is True
        # The dead worker's connections are gone; the new worker has its own, as before.
        after = redis_server.worker_connections()
        assert worker not in after
        new_workers = {pid for pid in ws_workers() - before_kill if stack.procs[0].pid in ancestors(pid)}
        assert len(new_workers) == 1
        [new] = new_workers
        assert after[new]["hub"] == 1 and after[new]["pool"] <= 4
        for ws in again:
            ws.close()
    finally:
        for proc in stack.procs:
            stop(proc)


@pytest.mark.timeout(120)
def test_graceful_reload_closes_with_1012_and_clients_recover(project, redis_server, tmp_path, facility):
    stack = start_stack("offload", project, tmp_path)
    try:
        url = stack.url(f"/ws/{facility}?subscribe-broadcast")
        clients, positions = _connected(url, 10, facility)
        ws_master = next(
            pid
            for pid in descendants(stack.procs[0].pid)
            if "uwsgi.ini.example:websocket" in cmdline(pid) and "websocket" not in cmdline(ancestors(pid)[0])
        )
        started = time.monotonic()
        os.kill(ws_master, signal.SIGHUP)  # graceful reload of the instance this test started
        for ws in clients:
            while True:
                opcode, data = ws.conn.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
            assert int.from_bytes(data[:2], "big") == 1012
        closed_after = time.monotonic() - started
        django_ws.publish(facility, "during reload", broadcast=True)

        for p in positions:
            again = wait_for(lambda p=p: _reconnect(url, p), what="reloaded worker")
            frames = again.ready()
            assert [f["data"] for f in frames if f["type"] == "message"] == ["during reload"]
            again.close()
        print(f"graceful reload: 10 clients closed with 1012 after {closed_after:.2f}s and recovered")
        assert closed_after < 10  # far less than the reload mercy (60 s)
    finally:
        for proc in stack.procs:
            stop(proc)


@pytest.mark.timeout(240)
def test_one_stalled_client_among_200_readers_of_2000_messages(project, tmp_path, facility):
    """The readers lose nothing, the stalled one is cut off, the server's memory stays bounded.

    In single-instance mode the stalled client's socket is the server's own (no relay
    buffering in between), so 2,000 messages of 3 kB (6 MB) overflow the kernel
    buffers and SEND_QUEUE_BYTES (1 MiB).
    """
    import asyncio
    import socket

    import websockets

    from tests.conftest import rss_kb

    stack = start_stack("single", project, tmp_path)
    url = stack.url(f"/ws/{facility}?subscribe-broadcast")
    chunk = "z" * 3000

    async def scenario():
        stalled_sock = socket.create_connection(("127.0.0.1", stack.port))
        stalled_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled = await websockets.connect(url, sock=stalled_sock, max_size=None, ping_interval=None)
        readers = [await websockets.connect(url, max_size=None, ping_interval=None) for _ in range(200)]
        for ws in [stalled, *readers]:
            while '"ready"' not in await asyncio.wait_for(ws.recv(), 30):
                pass
        stalled.transport.pause_reading()  # stop reading, like a frozen tab
        ws_pids = [stack.procs[0].pid, *descendants(stack.procs[0].pid)]
        rss_before = rss_kb(ws_pids)
        peak = rss_before

        async def read_all(ws):
            got = 0
            while got < 2000:
                frame = await asyncio.wait_for(ws.recv(), 60)
                if frame.startswith('{"type":"message"'):
                    # in order and none missing: the data starts with its sequence number
                    assert f'"data":"{got}:' in frame[:120], frame[:120]
                    got += 1
            return got

        async def cut_off():
            # Resume reading once the server has cut the client off (its log says so),
            # not at the end: a closed socket's unsent data is kept by the kernel only
            # so long (an orphaned connection is dropped after its window probes), and
            # on a loaded machine the end may come after that.
            deadline = loop.time() + 200
            while "closing slow consumer" not in stack.log.read_text(errors="replace"):
                assert loop.time() < deadline, "the stalled client was never cut off"
                await asyncio.sleep(0.05)
            stalled.transport.resume_reading()
            received = 0
            try:
                while True:
                    await asyncio.wait_for(stalled.recv(), 30)
                    received += 1
            except websockets.ConnectionClosed as closed:
                return received, closed.rcvd.code if closed.rcvd else None

        loop = asyncio.get_running_loop()
        reading = [asyncio.create_task(read_all(ws)) for ws in readers]
        cutting = asyncio.create_task(cut_off())
        for i in range(2000):
            await loop.run_in_executor(None, lambda i=i: django_ws.publish(facility, f"{i}:{chunk}", broadcast=True))
            if i % 100 == 0:
                peak = max(peak, rss_kb(ws_pids))
        counts = await asyncio.gather(*reading)
        peak = max(peak, rss_kb(ws_pids))
        received, code = await cutting
        for ws in readers:
            await ws.close()
        return counts, received, code, rss_before, peak

    try:
        counts, received, code, rss_before, peak = asyncio.run(scenario())
    finally:
        for proc in stack.procs:
            stop(proc)
    print(
        f"\n200 readers got {sum(counts)} of {200 * 2000} messages; the stalled client got {received} "
        f"before being closed (code {code}); websocket instance RSS {rss_before} kB, peak {peak} kB"
    )
    assert counts == [2000] * 200
    # Cut off once, while short of the 2,000: whether its 4008 frame got through
    # depends on how fast it read after the cut (printed above, not asserted).
    assert stack.log.read_text(errors="replace").count("closing slow consumer") == 1
    assert received < 2000
    assert peak - rss_before < 32_000  # bounded: the stalled client's 6 MB were not all kept
