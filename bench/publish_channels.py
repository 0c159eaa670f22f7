"""Publisher for the peer (Django Channels): channel_layer.group_send() from a separate process.

Run with bench/.venv-channels/bin/python, DJANGO_SETTINGS_MODULE=peer_settings and
bench/peer on sys.path (bench/run.py does). Same commands and answers as
bench/publish_ours.py. The frame text is built once per message, in our wire format
({"type": "message", "channel", "offset", "epoch", "data"}), and the consumer
forwards it unchanged, as our Hub does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "peer"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "peer_settings")

import django  # noqa: E402

django.setup()

from channels.layers import get_channel_layer  # noqa: E402

TEXT = "x" * 64


class OverCapacity(logging.Handler):
    """channels_redis drops a group message for a channel whose queue is full and
    only logs it ("N of M channels over capacity in group G"): count those."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "over capacity" in record.getMessage():
            self.count += int(record.args[0]) if record.args else 1


OVER = OverCapacity()
_layer_logger = logging.getLogger("channels_redis.core")
_layer_logger.addHandler(OVER)
_layer_logger.setLevel(logging.INFO)
_layer_logger.propagate = False


def out(document: dict) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def frame(channel: str, seq: int, data: dict) -> str:
    return json.dumps(
        {"type": "message", "channel": channel, "offset": seq, "epoch": "", "data": data}, separators=(",", ":")
    )


async def main() -> None:
    layer = get_channel_layer()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await layer.group_send("bench-warm-up", {"type": "bench.message", "text": "warm-up"})
    out({"event": "ready"})
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "broadcast":
            t = time.time()
            seq = cmd["seq"]
            text = frame("broadcast", seq, {"k": "b", "seq": seq, "t": t, "text": TEXT})
            await layer.group_send("bench", {"type": "bench.message", "text": text})
            out(
                {
                    "event": "done",
                    "t": t,
                    "call_ms": (time.time() - t) * 1000,
                    "receivers": None,
                    "over_capacity": OVER.count,
                }
            )
        elif cmd["cmd"] == "targeted":
            n, rate, seconds = int(cmd["n"]), float(cmd["rate"]), float(cmd["seconds"])
            total = int(rate * seconds)
            interval = 1.0 / rate
            start = time.monotonic()
            give_up = start + seconds * 2 + 5
            calls = []
            sent = 0
            for i in range(total):
                now = time.monotonic()
                if now > give_up:
                    break
                due = start + i * interval
                if due > now:
                    await asyncio.sleep(due - now)
                t = time.time()
                text = frame("user", i, {"k": "t", "seq": i, "i": i % n, "t": t, "text": TEXT})
                await layer.group_send(f"u{i % n}", {"type": "bench.message", "text": text})
                calls.append((time.time() - t) * 1000)
                sent += 1
            elapsed = time.monotonic() - start
            out(
                {
                    "event": "done",
                    "sent": sent,
                    "over_capacity": OVER.count,
                    "seconds": elapsed,
                    "rate": sent / elapsed,
                    "call_ms_p50": pct(calls, 50),
                    "call_ms_p99": pct(calls, 99),
                }
            )
        elif cmd["cmd"] == "quit":
            break


if __name__ == "__main__":
    asyncio.run(main())
