"""What the publish limits cost and save: the history byte cap and the rate check.

Usage: .venv/bin/python bench/store_limits.py [--publishes N]

Starts a private redis-server on a free loopback port and prints, on one channel:

* publishes per second of ``Store.publish`` (one round trip each, a full history of
  100 messages of 1 KiB, so every publish trims one), with and without a byte cap;
* the Redis memory (MEMORY USAGE) of a channel's history after 100 messages of
  64 KiB, with the default cap (1 MiB) and without one;
* rate checks per second of ``Store.allow`` (one round trip each).

Figures, not assertions: the machine may be shared. Runs with the code of the
checkout it is started from (``history_max_bytes`` is skipped where it does not exist,
which measures the previous publish script).
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import free_port, port_open, raise_fd_limit, stop, wait_for  # noqa: E402

from uwsgi_ws.protocol import KIND_BINARY, Audience, Kind, channel_name, log_key  # noqa: E402
from uwsgi_ws.store import Store  # noqa: E402


def _publish(store: Store, channel: str, payload: bytes, cap: int | None) -> None:
    options = {"history_size": 100, "history_ttl": 600.0}
    if cap is not None and "history_max_bytes" in inspect.signature(store.publish).parameters:
        options["history_max_bytes"] = cap
    store.publish([channel], KIND_BINARY, payload, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=5000, help="publishes per throughput figure")
    args = parser.parse_args()
    import redis

    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen([*command, "--dir", tmp], stdout=subprocess.DEVNULL, preexec_fn=raise_fd_limit)
        try:
            wait_for(lambda: port_open(port), 20, "redis-server")
            client = redis.Redis(port=port)
            store = Store(client)
            version = client.info("server")["redis_version"]
            print(f"redis {version}, {args.publishes} publishes per figure, one client, loopback")
            for label, cap in (("no byte cap", 0), ("1 MiB cap", 1 << 20)):
                channel = channel_name("bench", f"speed{cap}", Audience(Kind.BROADCAST))
                for _ in range(100):
                    _publish(store, channel, b"x" * 1024, cap)
                started = time.perf_counter()
                for _ in range(args.publishes):
                    _publish(store, channel, b"x" * 1024, cap)
                elapsed = time.perf_counter() - started
                print(f"publish, 1 KiB, full history, {label}: {args.publishes / elapsed:,.0f} per second")
            for label, cap in (("no byte cap", 0), ("default 1 MiB cap", 1 << 20)):
                channel = channel_name("bench", f"memory{cap}", Audience(Kind.BROADCAST))
                for _ in range(100):
                    _publish(store, channel, b"y" * 65536, cap)
                memory = client.memory_usage(log_key(channel), samples=0) or 0
                print(
                    f"history after 100 x 64 KiB, {label}: {client.xlen(log_key(channel))} entries, "
                    f"{memory / 1024:,.0f} KiB in Redis"
                )
            if hasattr(store, "allow"):
                from uwsgi_ws.protocol import rate_key

                key = rate_key("bench", "user:1")
                started = time.perf_counter()
                for _ in range(args.publishes):
                    store.allow(key, rate=1e9, burst=10)
                elapsed = time.perf_counter() - started
                print(f"rate check (Store.allow): {args.publishes / elapsed:,.0f} per second")
            client.close()
        finally:
            stop(proc, signal.SIGTERM)


if __name__ == "__main__":
    main()
