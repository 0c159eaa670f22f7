"""Soak: thousands of websockets with churn and steady publishing; nothing lost.

Runs for SOAK_MINUTES (default 1, as in CI) with SOAK_CONNECTIONS websockets
(default 1000); ``scripts/soak.sh MINUTES [CONNECTIONS]`` runs a longer one. Every
second some connections drop and come back with the positions they last saw. At the
end, every connection must have received every message published since it first
connected, exactly once and in order (live or recovered), and the websocket
instance's memory and Redis connections must not have grown.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import urllib.parse

import pytest

import django_ws
from tests.conftest import cmdline, descendants, rss_kb

MINUTES = float(os.environ.get("SOAK_MINUTES", "1"))
CONNECTIONS = int(os.environ.get("SOAK_CONNECTIONS", "1000"))
RATE = float(os.environ.get("SOAK_RATE", "20"))  # messages per second
CHURN = float(os.environ.get("SOAK_CHURN", "0.02"))  # share of connections cycled per second


class Client:
    """One logical subscriber: reconnects with recovery, records what it receives."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.received: list[int] = []
        self.position: list | None = None
        self.first: int | None = None  # first sequence number it is owed
        self.ws = None
        self.task: asyncio.Task | None = None
        self.not_recovered = 0
        self.reconnects = 0

    async def connect(self, published: list[int]) -> None:
        import websockets

        url = self.url
        if self.position is not None:
            url += "&recover=" + urllib.parse.quote(json.dumps({"broadcast": self.position}))
        self.ws = await websockets.connect(url, open_timeout=60, ping_interval=None, max_size=None)
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
            if frame["type"] == "ready":
                break
            self._take(frame)
        if self.first is None:
            # Owed everything published after its subscription took effect.
            self.first = published[0] if published else 0
        self.task = asyncio.create_task(self._read())

    def _take(self, frame: dict) -> None:
        if frame["type"] == "message":
            self.received.append(int(frame["data"]))
            self.position = [frame["offset"], frame["epoch"]]
        elif frame["type"] == "subscribed":
            self.position = [frame["offset"], frame["epoch"]]
            if frame["recovered"] is False:
                self.not_recovered += 1

    async def _read(self) -> None:
        import websockets

        try:
            async for raw in self.ws:
                self._take(json.loads(raw))
        except websockets.ConnectionClosed:
            pass

    async def cycle(self, published: list[int]) -> None:
        await self.close()
        self.reconnects += 1
        await self.connect(published)

    async def close(self) -> None:
        await self.ws.close()
        if self.task:
            await self.task


@pytest.mark.timeout(int(MINUTES * 60 + 600))
def test_soak_nothing_lost_nothing_grows(offload_stack, redis_server, facility):
    url = offload_stack.url(f"/ws/{facility}?subscribe-broadcast")
    ws_pids = [pid for pid in descendants(offload_stack.procs[0].pid) if "ini.example:websocket" in cmdline(pid)]
    assert ws_pids, "websocket instance processes not found"
    published: list[int] = []  # sequence numbers, in publish order

    async def publisher(stop_at: float) -> None:
        seq = 0
        loop = asyncio.get_running_loop()
        while time.monotonic() < stop_at:
            await loop.run_in_executor(None, lambda s=seq: django_ws.publish(facility, str(s), broadcast=True))
            published.append(seq)
            seq += 1
            await asyncio.sleep(1 / RATE)

    async def scenario():
        clients = [Client(url) for _ in range(CONNECTIONS)]
        gate = asyncio.Semaphore(100)

        async def start(client):
            async with gate:
                await client.connect(published)

        await asyncio.gather(*(start(c) for c in clients))
        rss_start = rss_kb(ws_pids)
        redis_start = redis_server.worker_connections()
        stop_at = time.monotonic() + MINUTES * 60
        producer = asyncio.create_task(publisher(stop_at))
        rng = random.Random(7)
        ticks = 0
        while time.monotonic() < stop_at:
            await asyncio.sleep(1)
            ticks += 1
            batch = rng.sample(clients, max(1, int(CONNECTIONS * CHURN)))
            await asyncio.gather(*(c.cycle(published) for c in batch))
            if ticks % 10 == 0:
                print(
                    f"  {ticks}s: {len(published)} published, {sum(c.reconnects for c in clients)} reconnects",
                    flush=True,
                )
        await producer
        # The last message marks the end: every client must reach it.
        last = published[-1]
        deadline = time.monotonic() + 60
        while any(not c.received or c.received[-1] != last for c in clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        rss_end = rss_kb(ws_pids)
        redis_end = redis_server.worker_connections()
        await asyncio.gather(*(c.close() for c in clients))
        return clients, rss_start, rss_end, redis_start, redis_end

    clients, rss_start, rss_end, redis_start, redis_end = asyncio.run(scenario())
    lost = duplicated = 0
    for c in clients:
        owed = list(range(c.first, published[-1] + 1))
        lost += len(set(owed) - set(c.received))
        duplicated += len(c.received) - len(set(c.received))
        assert c.received == owed, f"client owed {len(owed)} messages got {len(c.received)}"
    reconnects = sum(c.reconnects for c in clients)
    print(
        f"\nsoak: {MINUTES} min, {CONNECTIONS} websockets, {len(published)} messages published, "
        f"{reconnects} reconnections with recovery, {sum(len(c.received) for c in clients)} deliveries, "
        f"lost {lost}, duplicated {duplicated}; websocket instance RSS {rss_start} kB -> {rss_end} kB; "
        f"Redis connections per worker {redis_start} -> {redis_end}"
    )
    assert lost == 0 and duplicated == 0
    assert all(c.not_recovered == 0 for c in clients)
    assert rss_end < rss_start * 1.25 + 10_000  # no growth beyond noise
    assert {pid: v["hub"] for pid, v in redis_end.items()} == {pid: v["hub"] for pid, v in redis_start.items()}
    assert all(v["pool"] <= 4 for v in redis_end.values())
