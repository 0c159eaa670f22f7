"""Publisher for our stack: django_ws.publish() from a separate process.

Run with the project's virtualenv, DJANGO_SETTINGS_MODULE=chat.settings and the
example project on sys.path (bench/run.py does). Reads one JSON command per line on
stdin, answers one JSON line per command; see bench/loadgen.py for the payloads.
Argument: a JSON file with the session keys of the targeted connections (optional).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "example"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chat.settings")

import django  # noqa: E402

django.setup()

import django_ws  # noqa: E402

TEXT = "x" * 64  # a chat-sized message body
FACILITY = "bench"


def out(document: dict) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> None:
    keys: list[str] = json.loads(Path(sys.argv[1]).read_text()) if len(sys.argv) > 1 else []
    django_ws.publish("bench-warm-up", "warm-up", broadcast=True, history=False)  # connect to Redis, load the script
    out({"event": "ready"})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "broadcast":
            t = time.time()
            published = django_ws.publish(FACILITY, {"k": "b", "seq": cmd["seq"], "t": t, "text": TEXT}, broadcast=True)
            out({"event": "done", "t": t, "call_ms": (time.time() - t) * 1000, "receivers": published[0].receivers})
        elif cmd["cmd"] == "targeted":
            n, rate, seconds = int(cmd["n"]), float(cmd["rate"]), float(cmd["seconds"])
            total = int(rate * seconds)
            interval = 1.0 / rate
            start = time.monotonic()
            give_up = start + seconds * 2 + 5  # bounded even if Redis is slow
            calls = []
            sent = 0
            for i in range(total):
                now = time.monotonic()
                if now > give_up:
                    break
                due = start + i * interval
                if due > now:
                    time.sleep(due - now)
                t = time.time()
                django_ws.publish(
                    FACILITY, {"k": "t", "seq": i, "i": i % n, "t": t, "text": TEXT}, sessions=[keys[i % n]]
                )
                calls.append((time.time() - t) * 1000)
                sent += 1
            elapsed = time.monotonic() - start
            out(
                {
                    "event": "done",
                    "sent": sent,
                    "seconds": elapsed,
                    "rate": sent / elapsed,
                    "call_ms_p50": pct(calls, 50),
                    "call_ms_p99": pct(calls, 99),
                }
            )
        elif cmd["cmd"] == "quit":
            break


if __name__ == "__main__":
    main()
