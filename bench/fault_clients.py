"""Websocket clients for bench/faults.py: one asyncio process holding many (picows).

Each client is a browser tab: it subscribes to the broadcast channel and its own
user channel (its session cookie), remembers the last position it saw on each, and
when its connection ends it reconnects (capped, jittered backoff) with
``recover=`` those positions, as the browser client does. It records every message
it receives: the publisher's sequence number and time, when it arrived, and whether
it was replayed (before the "ready" frame of a reconnection).

Driven over stdin/stdout, one JSON document per line (answers carry "event": "done"):
    {"cmd": "connect", "url": "ws://.../ws/faults?subscribe-broadcast&subscribe-user",
     "cookies": ["...", ...], "first": 0, "timeout": 120}
    {"cmd": "status"}                     how many are open, connecting, ever failed
    {"cmd": "caught_up", "broadcast": 41, "user": {"3": 17, ...}}
                                          how many clients hold every message up to those
    {"cmd": "report", "since": t0, "until": t1, "fault": tf,
     "broadcast": [[seq, t], ...], "user": [[index, seq, t], ...]}
    {"cmd": "close"}
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
import urllib.parse
from collections import Counter

from picows import WSListener, WSMsgType, ws_connect

# A message that arrives later than this after it was published came from history
# (a resynchronising Hub) rather than live.
LATE = 1.0


def out(document: dict) -> None:
    sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Tab:
    """One logical client: one connection at a time, reconnecting with recovery."""

    def __init__(self, index: int, cookie: str, base: str) -> None:
        self.index = index
        self.cookie = cookie
        self.base = base
        self.positions: dict[str, list] = {}
        # kind ("b" or "u") -> seq -> (arrived, replayed)
        self.got: dict[str, dict[int, tuple[float, bool]]] = {"b": {}, "u": {}}
        self.duplicates: list[tuple[str, int]] = []
        self.not_recovered: list[tuple[float, str]] = []  # (when, channel)
        self.closes: list[tuple[float, int | None]] = []
        self.open = False
        self.ready = False
        self.connections = 0
        self.failures = 0
        self.transport = None
        self.last_event = 0.0  # the last subscribed, ready or close frame, or drop

    def url(self) -> str:
        if not self.positions:
            return self.base
        return self.base + "&recover=" + urllib.parse.quote(json.dumps(self.positions, separators=(",", ":")))


class Listener(WSListener):
    def __init__(self, tab: Tab, ready: asyncio.Future) -> None:
        self.tab = tab
        self.ready_future = ready

    def on_ws_connected(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.tab.transport = transport
        self.tab.open = True
        self.tab.ready = False

    def on_ws_frame(self, transport, frame) -> None:  # type: ignore[no-untyped-def]
        tab = self.tab
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            now = time.time()
            document = json.loads(frame.get_payload_as_bytes())
            what = document.get("type")
            if what == "message":
                tab.positions[document["channel"]] = [document["offset"], document["epoch"]]
                data = document["data"]
                k, seq = data["k"], data["s"]
                seen = tab.got[k]
                if seq in seen:
                    tab.duplicates.append((k, seq))
                else:
                    seen[seq] = (now, not tab.ready)
            elif what == "subscribed":
                tab.last_event = now
                tab.positions[document["channel"]] = [document["offset"], document["epoch"]]
                if document.get("recovered") is False:
                    tab.not_recovered.append((now, document["channel"]))
            elif what == "ready":
                tab.last_event = now
                tab.ready = True
                if not self.ready_future.done():
                    self.ready_future.set_result(now)
        elif kind == WSMsgType.CLOSE:
            code = frame.get_close_code()
            tab.last_event = time.time()
            tab.closes.append((tab.last_event, int(code)))
            transport.send_close(code)
            transport.disconnect()
        elif kind == WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())

    def on_ws_disconnected(self, transport) -> None:  # type: ignore[no-untyped-def]
        tab = self.tab
        if tab.open and (not tab.closes or tab.closes[-1][0] < time.time() - 0.5):
            tab.closes.append((time.time(), None))  # dropped without a close frame
        tab.open = False
        tab.ready = False
        if not self.ready_future.done():
            self.ready_future.set_exception(ConnectionError("closed before ready"))


class Clients:
    def __init__(self) -> None:
        self.tabs: list[Tab] = []
        self.closing = False
        self.connecting = 0
        self.tasks: list[asyncio.Task] = []
        self.gate = asyncio.Semaphore(200)  # handshakes in flight per process

    async def keep(self, tab: Tab, timeout: float) -> None:
        """Hold ``tab`` connected for the whole run, reconnecting as a browser does."""
        delay = 0.0
        while not self.closing:
            if delay:
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            done = loop.create_future()

            class Once(Listener):
                def on_ws_disconnected(self, transport) -> None:  # type: ignore[no-untyped-def]
                    super().on_ws_disconnected(transport)
                    if not done.done():
                        done.set_result(None)

            self.connecting += 1
            try:
                async with self.gate:
                    await ws_connect(
                        lambda: Once(tab, ready),
                        tab.url(),
                        extra_headers={"Cookie": f"sessionid={tab.cookie}"},
                        websocket_handshake_timeout=timeout,
                        read_buffer_init_size=4096,
                    )
                    await asyncio.wait_for(ready, timeout)
            except BaseException as exc:  # noqa: BLE001 - every failure is retried
                if isinstance(exc, asyncio.CancelledError) and self.closing:
                    return
                tab.failures += 1
                if tab.transport is not None and tab.open:
                    tab.transport.disconnect()
                self.connecting -= 1
                delay = min(5.0, max(0.2, delay * 2))
                continue
            self.connecting -= 1
            tab.connections += 1
            delay = 0.0
            await done
            delay = 0.2  # the browser client waits a moment before reconnecting

    def caught_up(self, broadcast: int, user: dict[str, int]) -> int:
        count = 0
        for tab in self.tabs:
            if not tab.open or not tab.ready:
                continue
            if broadcast >= 0 and max(tab.got["b"], default=-1) < broadcast:
                continue
            want = user.get(str(tab.index), -1)
            if want >= 0 and max(tab.got["u"], default=-1) < want:
                continue
            count += 1
        return count

    def report(self, cmd: dict) -> dict:
        # Owed: the messages given; events (frames, closes) counted from the fault on.
        until, fault = float(cmd["until"]), float(cmd["fault"])
        broadcast = [(int(s), float(t)) for s, t in cmd["broadcast"]]
        user: dict[int, list[tuple[int, float]]] = {}
        for index, s, t in cmd["user"]:
            user.setdefault(int(index), []).append((int(s), float(t)))
        broadcast_times = dict(broadcast)
        user_times = {index: dict(owed) for index, owed in user.items()}
        live = recovered = lost = duplicated = 0
        catch_up: list[float] = []
        lost_examples: list[list] = []
        for tab in self.tabs:
            worst = 0.0
            for kind, owed in (("b", broadcast), ("u", user.get(tab.index, ()))):
                got = tab.got[kind]
                for seq, published in owed:
                    arrived = got.get(seq)
                    if arrived is None:
                        lost += 1
                        if len(lost_examples) < 5:
                            lost_examples.append([tab.index, kind, seq])
                        continue
                    when, replayed = arrived
                    if replayed or when - published > LATE:
                        recovered += 1
                    else:
                        live += 1
                    if published >= fault:
                        worst = max(worst, when - fault)
            catch_up.append(worst)
            for kind, seq in tab.duplicates:
                published = (broadcast_times if kind == "b" else user_times.get(tab.index, {})).get(seq)
                if published is not None:
                    duplicated += 1
        not_recovered = sum(1 for tab in self.tabs if any(fault <= t <= until for t, _ in tab.not_recovered))
        codes: Counter[str] = Counter()
        for tab in self.tabs:
            for t, code in tab.closes:
                if fault <= t <= until:
                    codes[str(code)] += 1
        return {
            "live": live,
            "recovered": recovered,
            "lost": lost,
            "lost_examples": lost_examples,
            "duplicated": duplicated,
            "all_duplicates": sum(len(tab.duplicates) for tab in self.tabs),
            "not_recovered": not_recovered,
            "close_codes": dict(codes),
            "catch_up": catch_up,
        }


async def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=256 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    clients = Clients()
    out({"event": "started"})
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        name = cmd["cmd"]
        result: dict = {}
        if name == "connect":
            first = int(cmd["first"])
            for offset, cookie in enumerate(cmd["cookies"]):
                tab = Tab(first + offset, cookie, cmd["url"])
                clients.tabs.append(tab)
                clients.tasks.append(asyncio.create_task(clients.keep(tab, float(cmd.get("timeout", 60)))))
        elif name == "status":
            result = {
                "open": sum(1 for t in clients.tabs if t.open and t.ready),
                "connecting": clients.connecting,
                "failures": sum(t.failures for t in clients.tabs),
                "connections": sum(t.connections for t in clients.tabs),
                "last_event": max((t.last_event for t in clients.tabs), default=0.0),
            }
        elif name == "caught_up":
            result = {"count": clients.caught_up(int(cmd["broadcast"]), cmd["user"])}
        elif name == "report":
            result = clients.report(cmd)
        elif name == "close":
            clients.closing = True
            for tab in clients.tabs:
                if tab.transport is not None and tab.open:
                    try:
                        tab.transport.send_close()
                    except Exception:  # noqa: BLE001
                        pass
                    tab.transport.disconnect()
            for task in clients.tasks:
                task.cancel()
            await asyncio.sleep(0.2)
            out({"event": "done"})
            break
        out({"event": "done", **result})


if __name__ == "__main__":
    asyncio.run(main())
