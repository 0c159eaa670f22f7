"""Load generator: one asyncio process holding many websocket clients (picows).

Driven by bench/run.py over stdin/stdout, one JSON document per line. The same
program drives both systems under test; it only needs the servers to send text
frames starting with ``{"type":"message"`` for messages and ``{"type":"ready"`` once a
connection is subscribed (our wire format; the peer's consumer sends the same).

Each message's ``data`` carries ``k`` ("b" broadcast, "t" targeted), ``seq``, ``t``
(the publisher's ``time.time()`` just before publishing) and, for targeted messages,
``i`` (the index of the connection it is meant for). The receive path only stamps
and stores raw frames; they are parsed after each phase, so parsing does not add
to the measured latency.

Commands (each answered by a line with "event": "done"; progress lines in between):
    {"cmd": "connect", "url": "...{i}...", "lo": 0, "hi": 1000, "cookies": [...]|null,
     "origin": "http://...", "parallel": 100, "timeout": 30, "deadline": 600}
    {"cmd": "arm", "target": 1000}          forget stored frames, wake when target arrive
    {"cmd": "collect_broadcast", "seq": 3, "timeout": 30}
    {"cmd": "collect_targeted", "sent": 10000, "n": 5000, "timeout": 30}
    {"cmd": "close"}
"""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import sys
import time
from collections import Counter

from picows import WSListener, WSMsgType, ws_connect

MESSAGE = b'{"type":"message"'
READY = b'{"type":"ready"'


def out(document: dict) -> None:
    sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class State:
    def __init__(self) -> None:
        self.records: list[tuple[float, int, bytes]] = []
        self.target = float("inf")
        self.event = asyncio.Event()
        self.clients: dict[int, Client] = {}
        self.established: set[int] = set()
        self.dropped = 0
        self.closing = False
        self.close_codes: Counter[str] = Counter()


class Client(WSListener):
    def __init__(self, idx: int, state: State, ready: asyncio.Future) -> None:
        self.idx = idx
        self.state = state
        self.ready = ready
        self.transport = None
        self.open = False

    def on_ws_connected(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport
        self.open = True

    def on_ws_frame(self, transport, frame) -> None:  # type: ignore[no-untyped-def]
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            if payload.startswith(MESSAGE):
                state = self.state
                records = state.records
                records.append((time.time(), self.idx, payload))
                if len(records) >= state.target:
                    state.event.set()
            elif payload.startswith(READY):
                if not self.ready.done():
                    self.ready.set_result(time.time())
        elif kind == WSMsgType.CLOSE:
            self.state.close_codes[str(frame.get_close_code())] += 1
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport) -> None:  # type: ignore[no-untyped-def]
        if self.open and not self.state.closing:
            self.state.dropped += 1
        self.open = False
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before ready"))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q / 100.0 * (len(values) - 1)))))
    return values[k]


async def connect(state: State, cmd: dict) -> dict:
    loop = asyncio.get_running_loop()
    url: str = cmd["url"]
    cookies = cmd.get("cookies")
    origin = cmd.get("origin")
    timeout = float(cmd.get("timeout", 30))
    sem = asyncio.Semaphore(int(cmd.get("parallel", 100)))
    lo, hi = int(cmd["lo"]), int(cmd["hi"])
    times: list[float] = []
    errors: Counter[str] = Counter()
    started = time.time()
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        async with sem:
            headers = {}
            if origin:
                headers["Origin"] = origin
            if cookies:
                headers["Cookie"] = f"sessionid={cookies[i - lo]}"
            ready = loop.create_future()
            client = Client(i, state, ready)
            t0 = time.time()
            try:
                await ws_connect(
                    lambda: client,
                    url.replace("{i}", str(i)),
                    extra_headers=headers,
                    websocket_handshake_timeout=timeout,
                    read_buffer_init_size=4096,
                )
                t1 = await asyncio.wait_for(ready, timeout)
                times.append(t1 - t0)
                state.clients[i] = client
                state.established.add(i)
            except BaseException as exc:  # noqa: BLE001 - every failure is counted
                if isinstance(exc, asyncio.CancelledError) and not isinstance(exc, asyncio.TimeoutError):
                    errors["cancelled (phase deadline)"] += 1
                else:
                    errors[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
                if client.transport is not None:
                    client.transport.disconnect()
            finally:
                done += 1

    async def progress() -> None:
        while True:
            await asyncio.sleep(1.0)
            out({"event": "progress", "phase": "connect", "done": done, "of": hi - lo, "ok": len(times)})

    reporter = asyncio.create_task(progress())
    tasks = [asyncio.create_task(one(i)) for i in range(lo, hi)]
    _, pending = await asyncio.wait(tasks, timeout=float(cmd.get("deadline", 600)))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=10)
    reporter.cancel()
    elapsed = time.time() - started
    # Long-lived objects from here on: keep the collector away from the receive path.
    gc.collect()
    gc.freeze()
    return {
        "attempted": hi - lo,
        "established": len(times),
        "failed": hi - lo - len(times),
        "seconds": elapsed,
        "handshake_ms": [round(t * 1000, 2) for t in times],
        "errors": dict(errors.most_common(10)),
    }


async def wait_records(state: State, target: int, timeout: float) -> bool:
    state.target = target
    if len(state.records) >= target:
        return True
    state.event.clear()
    try:
        await asyncio.wait_for(state.event.wait(), timeout)
        return True
    except asyncio.TimeoutError:
        return False


def collect_broadcast(state: State, seq: int) -> dict:
    latencies = []
    seen: set[int] = set()
    duplicates = stray = 0
    first = last = None
    for stamp, idx, payload in state.records:
        data = json.loads(payload).get("data")
        if not isinstance(data, dict) or data.get("k") != "b" or data.get("seq") != seq:
            stray += 1
            continue
        if idx in seen:
            duplicates += 1
            continue
        seen.add(idx)
        latencies.append(round((stamp - data["t"]) * 1000, 3))
        first = stamp if first is None else min(first, stamp)
        last = stamp if last is None else max(last, stamp)
    expected = len(state.established)
    return {
        "expected": expected,
        "received": len(seen),
        "lost": expected - len(seen & state.established),
        "duplicates": duplicates,
        "stray": stray,
        "first": first,
        "last": last,
        "latency_ms": latencies,
    }


def expected_targeted(state: State, sent: int, n: int) -> set[tuple[int, int]]:
    return {(i % n, i) for i in range(sent) if i % n in state.established}


def collect_targeted(state: State, expected: set[tuple[int, int]]) -> dict:
    latencies = []
    seen: set[tuple[int, int]] = set()
    duplicates = misdelivered = stray = 0
    first = last = None
    for stamp, idx, payload in state.records:
        data = json.loads(payload).get("data")
        if not isinstance(data, dict) or data.get("k") != "t":
            stray += 1
            continue
        if data.get("i") != idx:
            misdelivered += 1
            continue
        key = (idx, data["seq"])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        latencies.append(round((stamp - data["t"]) * 1000, 3))
        first = stamp if first is None else min(first, stamp)
        last = stamp if last is None else max(last, stamp)
    return {
        "expected": len(expected),
        "received": len(seen & expected),
        "lost": len(expected - seen),
        "duplicates": duplicates,
        "misdelivered": misdelivered,
        "stray": stray,
        "first": first,
        "last": last,
        "latency_ms": latencies,
    }


async def close_all(state: State) -> None:
    state.closing = True
    for client in state.clients.values():
        transport = client.transport
        if transport is not None and client.open:
            try:
                transport.send_close()
            except Exception:  # noqa: BLE001
                pass
            transport.disconnect()
    await asyncio.sleep(0.2)


async def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    state = State()
    out({"event": "started", "nofile": hard})
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        name = cmd["cmd"]
        if name == "connect":
            result = await connect(state, cmd)
        elif name == "arm":
            state.records = []
            state.target = float("inf")
            result = {"open": sum(1 for c in state.clients.values() if c.open)}
        elif name == "collect_broadcast":
            open_now = sum(1 for c in state.clients.values() if c.open)
            complete = await wait_records(state, open_now, float(cmd["timeout"]))
            await asyncio.sleep(float(cmd.get("grace", 0.05)))  # duplicates, if any, arrive too
            result = collect_broadcast(state, int(cmd["seq"]))
            result["complete"] = complete
        elif name == "collect_targeted":
            expected = expected_targeted(state, int(cmd["sent"]), int(cmd["n"]))
            complete = await wait_records(state, len(expected), float(cmd["timeout"]))
            await asyncio.sleep(float(cmd.get("grace", 0.05)))
            result = collect_targeted(state, expected)
            result["complete"] = complete
        elif name == "status":
            result = {"open": sum(1 for c in state.clients.values() if c.open), "dropped": state.dropped}
        elif name == "close":
            await close_all(state)
            out({"event": "done", "dropped": state.dropped, "close_codes": dict(state.close_codes)})
            break
        else:
            result = {"error": f"unknown command {name}"}
        result["dropped"] = state.dropped
        result["close_codes"] = dict(state.close_codes)
        out({"event": "done", **result})


if __name__ == "__main__":
    asyncio.run(main())
