"""Benchmark: broadcast latency of normal readers beside hostile clients.

    .venv/bin/python bench/hostile.py                 # 200 readers, 50 rounds each way
    .venv/bin/python bench/hostile.py --readers 500 --rounds 40

One run of the offload stack (uwsgi.ini.example, as bench/run.py starts it), one
websocket worker, one Redis. The same readers (bench/loadgen.py) receive timestamped
broadcasts (bench/publish_ours.py) twice, side by side:

1. alone;
2. beside FLOODERS sockets that send tiny frames as fast as they can (empty pongs,
   6 bytes each: the server must parse every one and has nothing to answer, so
   nothing on the way slows the flood down but the server itself; they read and
   discard what they get), and NON_READERS sockets that send 125-byte pings and
   never read (a closed one is opened again).

It prints the readers' broadcast p50/p99 in both phases and the websocket worker's
RSS before and after (and its peak, sampled every 50 ms). The targets it is read
against: p99 beside the hostile sockets within 2x of the p99 alone, RSS growth under
20 MB. Nothing is asserted: the machine may be shared, so say so with the figures.

Everything runs on 127.0.0.1; every process started here is stopped by its pid; every
phase has a deadline, the hostile clients a bound on their reconnections.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import run  # noqa: E402  (bench/run.py: the stack, Redis, the pipes, the figures)

# The example project allows the benchmark's own facility only (EXAMPLE_FACILITIES):
# the hostile sockets subscribe to the readers' broadcast channel, as an attacker
# would subscribe to whatever is public.
HOSTILE_FACILITY = "bench"
MAX_RECONNECTS = 200  # per non-reading socket


# --------------------------------------------------------------------------- the hostile clients


def hostile_main(port: int, flooders: int, non_readers: int) -> None:
    """Run the hostile sockets until a "stop" line arrives on stdin; print their figures."""
    from tests.security.hostile_clients import OP_PING, OP_PONG, RawWebSocket, client_frame

    server = SimpleNamespace(port=port)
    path = f"/ws/{HOSTILE_FACILITY}?subscribe-broadcast"
    stopping = threading.Event()
    stats: dict[str, Any] = {
        "flood_bytes": 0,
        "bytes_read": 0,
        "non_reader_bytes": 0,
        "reconnects": 0,
        "failed_handshakes": 0,
    }
    lock = threading.Lock()

    def count(key: str, n: int) -> None:
        with lock:
            stats[key] += n

    def flood() -> None:
        try:
            client = RawWebSocket(server, path)
            client.read_until_ready()
        except OSError:
            count("failed_handshakes", 1)
            return
        chunk = client_frame(OP_PONG) * 10922

        def drain() -> None:
            client.sock.settimeout(1.0)
            while not stopping.is_set():
                try:
                    data = client.sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                count("bytes_read", len(data))

        threading.Thread(target=drain, daemon=True).start()
        client.sock.settimeout(1.0)
        while not stopping.is_set():
            try:
                client.sock.sendall(chunk)
            except TimeoutError:
                continue
            except OSError:
                return
            count("flood_bytes", len(chunk))
        client.close()

    def never_read() -> None:
        chunk = client_frame(OP_PING, b"p" * 125) * 500
        for attempt in range(MAX_RECONNECTS):
            if stopping.is_set():
                return
            if attempt:
                count("reconnects", 1)
            try:
                client = RawWebSocket(server, path, rcvbuf=4096)
                client.read_until_ready()
            except OSError:
                count("failed_handshakes", 1)
                time.sleep(0.5)
                continue
            client.sock.settimeout(1.0)
            while not stopping.is_set():
                try:
                    client.sock.sendall(chunk)
                except TimeoutError:
                    continue  # the server stopped reading it: keep trying, as an attacker would
                except OSError:
                    break  # closed by the server: open another
                count("non_reader_bytes", len(chunk))
            client.close()

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(flooders)]
    threads += [threading.Thread(target=never_read, daemon=True) for _ in range(non_readers)]
    for thread in threads:
        thread.start()
    print(json.dumps({"event": "started"}), flush=True)
    for line in sys.stdin:
        if json.loads(line).get("cmd") == "stop":
            break
    stopping.set()
    for thread in threads:
        thread.join(5)
    print(json.dumps({"event": "done", **stats}), flush=True)


# --------------------------------------------------------------------------- the benchmark


class PeakRSS(threading.Thread):
    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = run.memory_kb(pids)["rss_kb"]
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            self.peak = max(self.peak, run.memory_kb(self.pids)["rss_kb"])


def broadcast_rounds(label: str, rounds: int, loadgen: run.Pipe, publisher: run.Pipe, first_seq: int) -> list[float]:
    latencies: list[float] = []
    for r in range(rounds):
        seq = first_seq + r
        loadgen.call({"cmd": "arm"}, 30)
        publisher.call({"cmd": "broadcast", "seq": seq}, 60)
        got = loadgen.call({"cmd": "collect_broadcast", "seq": seq, "timeout": 30}, 60)
        latencies += got["latency_ms"]
        if got["lost"]:
            run.log(f"{label}: round {r + 1}: {got['lost']} readers did not get the message")
        time.sleep(0.2)
    return latencies


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readers", type=int, default=200)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--flooders", type=int, default=10)
    p.add_argument("--non-readers", type=int, default=10)
    p.add_argument("--warm-up", type=float, default=3.0, help="seconds of hostile traffic before measuring")
    p.add_argument("--hostile-port", type=int, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.hostile_port:
        hostile_main(args.hostile_port, args.flooders, args.non_readers)
        return 0

    stack_args = run.parse_args(["--only", "ours", "--n", str(args.readers)])
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        redis = run.Redis(Path(tmp))
        system = run.Ours(stack_args, redis, Path(tmp))
        loadgen: run.Pipe | None = None
        publisher: run.Pipe | None = None
        hostile: run.Pipe | None = None
        try:
            system.prepare(args.readers)
            system.start()
            loadgen = run.Pipe("loadgen", [sys.executable, str(BENCH / "loadgen.py")])
            loadgen.wait_event("started", 30)
            answer = loadgen.call(
                {
                    "cmd": "connect",
                    "url": system.url(),
                    "lo": 0,
                    "hi": args.readers,
                    "cookies": system.cookies(0, args.readers),
                    "origin": system.origin(),
                    "parallel": 50,
                    "timeout": 30,
                    "deadline": 120,
                },
                180,
            )
            run.log(f"{answer['established']}/{args.readers} readers connected")
            publisher = system.publisher()
            publisher.wait_event("ready", 60)
            workers = system.ws_workers()

            run.log(f"phase 1: {args.rounds} broadcast rounds, readers alone")
            alone = broadcast_rounds("alone", args.rounds, loadgen, publisher, 1)
            rss_before = run.memory_kb(workers)["rss_kb"]

            run.log(f"phase 2: the same beside {args.flooders} flooding and {args.non_readers} non-reading sockets")
            hostile = run.Pipe(
                "hostile",
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--hostile-port",
                    str(system.port),
                    "--flooders",
                    str(args.flooders),
                    "--non-readers",
                    str(args.non_readers),
                ],
            )
            hostile.wait_event("started", 60)
            sampler = PeakRSS(workers)
            sampler.start()
            cpu0 = run.cpu_seconds(workers)
            time.sleep(args.warm_up)  # let the floods fill every buffer on the way
            beside = broadcast_rounds("beside hostile", args.rounds, loadgen, publisher, 1001)
            cpu1 = run.cpu_seconds(workers)
            rss_after = run.memory_kb(workers)["rss_kb"]
            sampler.stopping.set()
            sampler.join(5)
            hostile.send({"cmd": "stop"})
            figures = hostile.wait_event("done", 60)
            status = loadgen.call({"cmd": "status"}, 30)
        finally:
            for pipe, quit_command in ((hostile, None), (loadgen, {"cmd": "close"}), (publisher, {"cmd": "quit"})):
                if pipe is None:
                    continue
                if quit_command is not None:
                    try:
                        pipe.send(quit_command)
                    except OSError:
                        pass
                pipe.close()
            system.stop()
            redis.stop()

    a, b = run.summary(alone), run.summary(beside)
    ratio = b["p99"] / a["p99"] if a["p99"] else float("nan")
    print()
    print(f"{args.readers} readers, {args.rounds} broadcast rounds per phase, one websocket worker (offload)")
    print(f"{'':28}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'deliveries':>12}")
    print(f"{'alone':28}{a['p50']:>10.1f}{a['p99']:>10.1f}{a['max']:>10.1f}{a['count']:>12}")
    print(f"{'beside the hostile sockets':28}{b['p50']:>10.1f}{b['p99']:>10.1f}{b['max']:>10.1f}{b['count']:>12}")
    print(f"p99 ratio: {ratio:.2f} (target: at most 2)")
    print(
        f"websocket worker RSS: {rss_before / 1024:.1f} MB before, {rss_after / 1024:.1f} MB after, "
        f"peak {sampler.peak / 1024:.1f} MB: growth {(sampler.peak - rss_before) / 1024:.1f} MB (target: under 20)"
    )
    print(f"websocket worker CPU during phase 2: {cpu1 - cpu0:.1f} s")
    print(
        f"hostile traffic: {figures['flood_bytes'] / 6:,.0f} tiny frames sent by the flooders "
        f"(they read {figures['bytes_read']:,} bytes), {figures['non_reader_bytes'] / 131:,.0f} pings "
        f"by the non-readers, which were closed and opened again {figures['reconnects']} times; "
        f"{figures['failed_handshakes']} hostile handshakes failed"
    )
    print(f"readers closed by the server: {status['dropped']} (close codes {status['close_codes']})")
    print(f"machine: {json.dumps(run.machine())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
