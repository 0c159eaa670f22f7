"""A websocket worker dies: clients reconnect and recover, no Redis connection leaks."""

from __future__ import annotations

import json
import os
import signal
import urllib.parse

import pytest
import websocket

import django_ws
from tests.conftest import WS, start_stack, stop, wait_for


@pytest.mark.timeout(120)
def test_killed_worker_clients_recover_and_nothing_leaks(project, redis_server, tmp_path, facility):
    stack = start_stack("offload", project, tmp_path)
    try:
        url = stack.url(f"/ws/{facility}?subscribe-broadcast")
        clients = [WS(url) for _ in range(20)]
        for ws in clients:
            ws.ready()
        django_ws.publish(facility, "before", broadcast=True)
        positions = [ws.next() for ws in clients]
        assert {p["data"] for p in positions} == {"before"}

        # The websocket worker names its Redis connections with its pid.
        def ws_workers() -> set[int]:
            return {pid for pid, counts in redis_server.worker_connections().items() if counts["hub"]}

        before_kill = ws_workers()
        [worker] = [pid for pid in before_kill if stack.procs[0].pid in _ancestors(pid)]
        os.kill(worker, signal.SIGKILL)  # a worker of the stack this test started
        for ws in clients:
            with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
                while True:
                    ws.next()
        for i in range(5):
            django_ws.publish(facility, f"missed {i}", broadcast=True)

        def reconnect(position):
            query = urllib.parse.quote(json.dumps({"broadcast": [position["offset"], position["epoch"]]}))
            try:
                return WS(url + "&recover=" + query)
            except (OSError, websocket.WebSocketException):
                return None  # the respawned worker is not listening yet

        again = [wait_for(lambda p=p: reconnect(p), what="respawned worker") for p in positions]
        for ws in again:
            frames = ws.ready()
            assert [f["data"] for f in frames if f["type"] == "message"] == [f"missed {i}" for i in range(5)]
            assert frames[-1]["recovered"] is True
        # The dead worker's connections are gone; the new worker has its own, as before.
        after = redis_server.worker_connections()
        assert worker not in after
        new_workers = {pid for pid in ws_workers() - before_kill if stack.procs[0].pid in _ancestors(pid)}
        assert len(new_workers) == 1
        [new] = new_workers
        assert after[new]["hub"] == 1 and after[new]["pool"] <= 4
        for ws in again:
            ws.close()
    finally:
        for proc in stack.procs:
            stop(proc)


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain
