"""What presence costs on Redis: 10,000 connections in one channel.

Usage: .venv/bin/python bench/presence.py [--connections N] [--users U]

Starts a private redis-server on a free loopback port and drives the websocket
worker's own presence code (``PresenceTracker``, the scripts the sessions run) for N
connections of U users in one broadcast channel, with join/leave events and the
events stream on, and prints:

* join and leave: wall time per connection (one script call, plus the event and the
  stream entry for a user's first and last connection), and the Redis CPU per call of
  each script (INFO commandstats, usec_per_call);
* the roster read (``presence()``, O(members)) and the count (``presence_count()``,
  O(1)) with N connections, median of 20 reads;
* a lease renewal (one call per channel per worker, whatever N);
* the reaping of a dead worker's N/2 entries (one pass over the members, once);
* the Redis memory of the channel's presence keys.

Figures, not assertions: the machine may be shared.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import free_port, port_open, raise_fd_limit, stop, wait_for  # noqa: E402

from uwsgi_ws import presence  # noqa: E402
from uwsgi_ws.presence import PresenceTracker  # noqa: E402
from uwsgi_ws.protocol import Audience, Kind, channel_name, members_key, users_key, workers_key  # noqa: E402


def timed_calls(client, action) -> tuple[float, int, float]:
    """Run ``action``; return its wall time, and the EVALSHA calls and Redis usec it cost."""
    client.config_resetstat()
    started = time.perf_counter()
    action()
    elapsed = time.perf_counter() - started
    stat = client.info("commandstats").get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return elapsed, int(stat["calls"]), float(stat["usec"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--users", type=int, default=5000, help="distinct users among the connections")
    args = parser.parse_args()
    import redis

    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    n, users = args.connections, args.users
    with tempfile.TemporaryDirectory() as tmp:
        command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen([*command, "--dir", tmp], stdout=subprocess.DEVNULL, preexec_fn=raise_fd_limit)
        try:
            wait_for(lambda: port_open(port), 20, "redis-server")
            client = redis.Redis(port=port)
            version = client.info("server")["redis_version"]
            print(f"redis {version}; {n:,} connections of {users:,} users in one channel; one client, loopback")
            channel = channel_name("bench", "room", Audience(Kind.BROADCAST))
            live = PresenceTracker(client, "bench", worker="live", background=False)
            dead = PresenceTracker(client, "bench", worker="dead", background=False)
            info = {"name": "someone with a name"}

            def join_all() -> None:
                for i in range(n):
                    tracker = dead if i % 2 else live
                    # the dead worker's lease ends some seconds after its last join
                    tracker.join(
                        f"c{i}",
                        [channel],
                        user=f"user{i % users}",
                        info=info,
                        ttl=10.0 if i % 2 else 60.0,
                        stream_size=10000,
                        since=time.time(),
                    )

            elapsed, calls, usec = timed_calls(client, join_all)
            print(
                f"join: {elapsed / n * 1e6:,.0f} µs per connection (wall, with events and stream), "
                f"Redis {usec / max(calls, 1):.1f} µs per script call ({calls:,} calls: join + the events' publish)"
            )
            reads, counts = [], []
            for _ in range(20):
                started = time.perf_counter()
                roster = presence.read(client, channel)
                reads.append(time.perf_counter() - started)
                started = time.perf_counter()
                occupancy = presence.count(client, channel)
                counts.append(time.perf_counter() - started)
            assert roster.connections == n and occupancy.connections == n, (roster.connections, occupancy)
            print(
                f"presence() with {n:,} connections ({len(roster.members):,} members): "
                f"{statistics.median(reads) * 1000:.1f} ms median; presence_count(): "
                f"{statistics.median(counts) * 1000:.2f} ms median"
            )
            memory = sum(
                client.memory_usage(k, samples=0) or 0
                for k in (members_key(channel), users_key(channel), workers_key(channel))
            )
            print(
                f"Redis memory of the channel's presence: {memory / 1024:,.0f} KiB "
                f"({memory / n:,.0f} bytes per connection)"
            )
            elapsed, calls, usec = timed_calls(client, live.renew)
            print(
                f"lease renewal of one worker holding {n // 2:,} of them: {elapsed * 1000:.2f} ms wall, "
                f"{calls} script call(s), Redis {usec:.0f} µs (before the dead lease ends)"
            )
            wait_for(
                lambda: (
                    presence.count(client, channel).connections == n
                    and presence.read(client, channel).connections == n // 2
                ),
                30,
                "the dead lease to end",
            )
            left: list = []
            elapsed, calls, usec = timed_calls(client, lambda: left.extend(live.renew()))
            print(
                f"reaping the dead worker's {n - n // 2:,} entries: {elapsed * 1000:.1f} ms wall, "
                f"Redis {usec / 1000:.1f} ms in {calls} script call(s) (the TOUCH among them), "
                f"{len([c for c in left if c.kind == 'left'])} leaves"
            )
            remaining = [(f"c{i}", f"user{i % users}") for i in range(0, n, 2)]

            def leave_all() -> None:
                for conn, user in remaining:
                    live.leave(conn, [channel], user=user, stream_size=10000)

            elapsed, calls, usec = timed_calls(client, leave_all)
            print(
                f"leave: {elapsed / len(remaining) * 1e6:,.0f} µs per connection (wall, with events and stream), "
                f"Redis {usec / max(calls, 1):.1f} µs per script call"
            )
            assert presence.count(client, channel).connections == 0
            client.close()
        finally:
            stop(proc, signal.SIGTERM)


if __name__ == "__main__":
    main()
