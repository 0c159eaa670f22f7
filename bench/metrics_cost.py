"""Benchmark: what the metrics cost on the broadcast path.

    .venv/bin/python bench/metrics_cost.py                  # 1,000 sockets, 200 rounds, 3 pairs
    .venv/bin/python bench/metrics_cost.py --n 500 --rounds 100 --pairs 2

The websocket instance alone (``uwsgi --ini uwsgi.ini.example:websocket``, one
worker), with DJANGO_WS_METRICS=1 and =0 in turn, fresh each time: N websockets
handed over directly on its unix socket (as the front's offload thread does, with
tickets signed here), then ROUNDS broadcasts, each published once every socket has
the previous one. The figure is the instance's CPU (utime + stime of its master and
worker, /proc) over the broadcast phase, per delivery. The registry heartbeat
(DJANGO_WS_REGISTRY_INTERVAL, default 1 s) runs in both runs: only the counting
differs. Runs alternate off/on so that a change of the machine's load hits both.

It prints each run and the median of each mode; nothing is asserted (the machine may
be shared). Everything runs on loopback and a private directory; every process
started here is stopped by its pid; every phase has a deadline.
"""

from __future__ import annotations

import argparse
import os
import secrets
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import run  # noqa: E402  (bench/run.py: Redis, processes, CPU figures)

CHANNEL = "{ws:metricsbench:broadcast}"


def start_instance(redis_url: str, secret: str, sock: Path, metrics: bool, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PATH": f"{run.BIN}:{os.environ.get('PATH', '')}",
        "DJANGO_WS_SECRET": secret,
        "DJANGO_WS_REDIS_URL": redis_url,
        "DJANGO_WS_OFFLOAD_TO": str(sock),
        "DJANGO_WS_WORKERS": "1",
        "DJANGO_WS_ASYNC": "5000",
        "DJANGO_WS_METRICS": "1" if metrics else "0",
    }
    proc = subprocess.Popen(
        [str(run.UWSGI), "--ini", "uwsgi.ini.example:websocket"],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=run.raise_fd_limit,
    )
    run.wait_for(lambda: sock.exists() and _connectable(sock), 30, "websocket instance")
    return proc


def _connectable(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def open_sockets(sock: Path, secret: str, n: int) -> list:
    from tests.direct import handshake_vars, new_key, open_direct
    from uwsgi_ws.protocol import Limits, Ticket, sign_ticket

    opened = []
    for _ in range(n):
        key = new_key()
        ticket = Ticket(subscribe={"broadcast": CHANNEL}, limits=Limits(), expires=time.time() + 60, key=key)
        conn, rest = open_direct(str(sock), handshake_vars(sign_ticket(ticket, secret.encode()), key=key))
        conn.setblocking(False)
        opened.append([conn, bytearray(rest), 0])
    return opened


def count_messages(entry: list) -> None:
    """Count the complete "message" frames in the buffer; keep the rest."""
    buffer = entry[1]
    start = 0
    while len(buffer) - start >= 2:
        length = buffer[start + 1] & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) - start < 4:
                break
            length = int.from_bytes(buffer[start + 2 : start + 4], "big")
            offset = 4
        elif length == 127:
            if len(buffer) - start < 10:
                break
            length = int.from_bytes(buffer[start + 2 : start + 10], "big")
            offset = 10
        end = start + offset + length
        if end > len(buffer):
            break
        if b'"type":"message"' in buffer[start + offset : start + offset + 24]:
            entry[2] += 1
        start = end
    del buffer[:start]


def wait_all(selector: selectors.BaseSelector, entries: list, target: int, deadline: float) -> None:
    behind = [e for e in entries if e[2] < target]
    while behind:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(behind)} sockets did not get message {target}")
        for key, _ in selector.select(1.0):
            entry = key.data
            try:
                data = entry[0].recv(65536)
            except BlockingIOError:
                continue
            if not data:
                raise ConnectionError("the server closed a socket")
            entry[1] += data
            count_messages(entry)
        behind = [e for e in behind if e[2] < target]


def one_run(redis: run.Redis, tmp: Path, n: int, rounds: int, metrics: bool) -> dict:
    import redis as redis_py

    from uwsgi_ws.store import Store

    secret = secrets.token_hex(32)
    private = Path(tempfile.mkdtemp(dir=tmp))
    os.chmod(private, 0o700)
    sock = private / "ws.sock"
    proc = start_instance(redis.url, secret, sock, metrics, tmp / f"ws-{'on' if metrics else 'off'}.log")
    entries: list = []
    try:
        entries = open_sockets(sock, secret, n)
        selector = selectors.DefaultSelector()
        for entry in entries:
            selector.register(entry[0], selectors.EVENT_READ, entry)
        wait_all(selector, entries, 0, time.monotonic() + 30)
        store = Store(redis_py.Redis.from_url(redis.url))
        pids = [proc.pid, *run.descendants(proc.pid)]
        time.sleep(1.0)  # let the connection phase settle
        cpu_before = run.cpu_seconds(pids)
        started = time.monotonic()
        payload = b'{"n":0,"text":"' + b"x" * 150 + b'"}'
        for i in range(1, rounds + 1):
            store.publish([CHANNEL], b"j", payload, history_size=0, history_ttl=60)
            wait_all(selector, entries, i, time.monotonic() + 30)
        elapsed = time.monotonic() - started
        cpu = run.cpu_seconds(pids) - cpu_before
        deliveries = n * rounds
        return {
            "metrics": metrics,
            "deliveries": deliveries,
            "cpu_s": cpu,
            "us_per_delivery": cpu / deliveries * 1e6,
            "seconds": elapsed,
        }
    finally:
        for entry in entries:
            entry[0].close()
        run.stop(proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="websockets (default 1000)")
    p.add_argument("--rounds", type=int, default=200, help="broadcasts per run (default 200)")
    p.add_argument("--pairs", type=int, default=3, help="off/on pairs of runs (default 3)")
    args = p.parse_args(argv)
    run.raise_fd_limit()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        redis = run.Redis(tmp)
        results: list[dict] = []
        try:
            for pair in range(args.pairs):
                for metrics in (False, True):
                    result = one_run(redis, tmp, args.n, args.rounds, metrics)
                    results.append(result)
                    print(
                        f"pair {pair + 1} metrics {'on ' if metrics else 'off'}: {result['deliveries']:,} deliveries, "
                        f"CPU {result['cpu_s']:.3f} s = {result['us_per_delivery']:.2f} µs per delivery "
                        f"({result['seconds']:.1f} s)",
                        flush=True,
                    )
        finally:
            redis.stop()
    off = statistics.median(r["us_per_delivery"] for r in results if not r["metrics"])
    on = statistics.median(r["us_per_delivery"] for r in results if r["metrics"])
    print(
        f"median CPU per delivery: metrics off {off:.2f} µs, on {on:.2f} µs: "
        f"{(on - off) / off * 100:+.1f} % ({args.n} sockets, {args.rounds} rounds, {args.pairs} pairs)"
    )
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
