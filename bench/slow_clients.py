"""Slow clients against the front: how long a page takes, unprotected and protected.

    .venv/bin/python bench/slow_clients.py                 # every case (about 4 minutes)
    .venv/bin/python bench/slow_clients.py front-0 front-3 front-50 nginx
    .venv/bin/python bench/slow_clients.py --window 60 socket-timeout-1

Each case starts the example stack from uwsgi.ini.example with the ini's front of
2 processes x 2 threads (plus the uWSGI options the case adds), fetches one page to
warm it up, opens its slow connections (each sends a header line, or a byte of a
request body, every INTERVAL seconds and never finishes its request) to the front's
own ``http-socket``, to uWSGI's HTTP router, or to nginx running
the deployment guide's snippet (docs/howto/deploy.md),
then fetches the home page one request after the other for --window seconds. It prints
how many pages were answered and the slowest, or how long the client waited in vain,
and how many of the front's threads were inside a request (uWSGI's stats server).

Everything runs on 127.0.0.1 with a private Redis; every process started here is
stopped by its pid; each case lasts about --window seconds plus start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import BIN, UWSGI, free_port, port_open, start_redis, stop, wait_for  # noqa: E402
from tests.security.test_slow_clients import SlowClients, Starved, fetch_page  # noqa: E402
from tests.test_nginx import readme_server, running_nginx  # noqa: E402

WINDOW = 12.0  # default seconds of page fetching while the slow connections run (--window)


@dataclass
class Case:
    name: str
    slow: dict[str, int]  # kind -> count
    interval: float = 2.0
    options: list[str] = field(default_factory=list)  # uWSGI options for the front only
    via: str = "front"  # front | router | nginx | nginx-unbuffered

    def describe(self) -> str:
        slow = ", ".join(f"{n} {kind}" for kind, n in self.slow.items())
        slow = f"{slow} every {self.interval:g} s" if slow else "no slow connections"
        extra = " ".join(self.options) or "ini defaults"
        return f"{self.name}: via {self.via}, {slow}, front: {extra}"


ALL = "header", "body", "handshake"
CASES = [
    Case("front-0", {}),
    Case("front-3", {"header": 3}),
    Case("front-4", {"header": 4}),
    Case("front-50", {"header": 50}),
    Case("front-50-body", {"body": 50}),
    Case("socket-timeout-1", {"header": 50}, options=["--socket-timeout", "1"]),
    Case("socket-timeout-1-fast", {"header": 50}, interval=0.5, options=["--socket-timeout", "1"]),
    Case("harakiri-5", {"header": 50}, options=["--harakiri", "5"]),
    Case("router", {"header": 50}, via="router"),
    Case("router-headers-timeout-5", {"header": 50}, via="router", options=["--http-headers-timeout", "5"]),
    Case("router-body", {"body": 50}, via="router"),
    Case("nginx", dict.fromkeys(ALL, 50), via="nginx"),
    Case("nginx-unbuffered", dict.fromkeys(ALL, 50), via="nginx-unbuffered"),
]


@dataclass
class Front:
    proc: subprocess.Popen
    port: int  # where the case's clients connect: the http-socket, or the router
    http_socket: int
    stats_port: int

    def busy_threads(self) -> tuple[int, int]:
        with socket.create_connection(("127.0.0.1", self.stats_port), timeout=5) as s:
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        cores = [c for w in json.loads(b"".join(chunks))["workers"] for c in w["cores"]]
        return sum(c["in_request"] for c in cores), len(cores)


def prepare_project(tmp: Path, redis_url: str) -> dict[str, str]:
    env = {
        "DJANGO_SETTINGS_MODULE": "chat.settings",
        "EXAMPLE_DB": str(tmp / "db.sqlite3"),
        "DJANGO_WS_REDIS_URL": redis_url,
        "DJANGO_WS_SECRET": secrets.token_hex(16),
        "DJANGO_DEBUG": "0",
    }
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
        cwd=ROOT / "example",
        env={**os.environ, **env},
        check=True,
        timeout=120,
    )
    return env


@contextlib.contextmanager
def running_front(case: Case, project: dict[str, str], tmp: Path) -> Iterator[Front]:
    """Run uwsgi.ini.example with the case's extra options on the command line (front only)."""
    http_socket, ws_port, stats_port = free_port(), free_port(), free_port()
    options = [*case.options, "--stats", f"127.0.0.1:{stats_port}"]
    port = http_socket
    if case.via == "router":
        # uWSGI's HTTP router process, passing requests to the workers on a uwsgi socket
        port, workers = free_port(), free_port()
        options += ["--socket", f"127.0.0.1:{workers}", "--http", f"127.0.0.1:{port}"]
        options += ["--http-to", f"127.0.0.1:{workers}"]
    env = {
        **os.environ,
        **project,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "DJANGO_WS_HTTP": f"127.0.0.1:{http_socket}",
        "DJANGO_WS_OFFLOAD_TO": f"127.0.0.1:{ws_port}",
        "DJANGO_WS_PROCESSES": "2",
        "DJANGO_WS_THREADS": "2",
    }
    log = tmp / f"{case.name}.log"
    proc = subprocess.Popen(
        [str(UWSGI), "--ini", "uwsgi.ini.example", "--listen", "1024", *options],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        try:
            for p in {port, http_socket, ws_port, stats_port}:
                wait_for(lambda p=p: proc.poll() is None and port_open(p), what=f"port {p}", timeout=30)
        except TimeoutError:
            raise RuntimeError(f"the front did not start; log:\n{log.read_text()[-3000:]}") from None
        yield Front(proc, port, http_socket, stats_port)
    finally:
        stop(proc)


@contextlib.contextmanager
def entry(case: Case, front: Front, tmp: Path) -> Iterator[int]:
    """Yield the port the case's clients use: the front's, or nginx's in front of it."""
    if not case.via.startswith("nginx"):
        yield front.port
        return
    port = free_port()
    server = readme_server(front.http_socket, port)
    if case.via == "nginx-unbuffered":
        server = server.replace("proxy_request_buffering on;", "proxy_request_buffering off;")
    nginx_dir = tmp / f"nginx-{case.name}"
    nginx_dir.mkdir()
    with running_nginx(server, port, nginx_dir):
        yield port


def held_threads(front: Front, seconds: float = 1.0) -> tuple[int, int]:
    """Return the fewest front threads inside a request over ``seconds`` with no page in flight.

    A thread that has just answered a page frees itself in milliseconds; one that a slow
    connection holds stays busy the whole time.
    """
    fewest, threads = front.busy_threads()
    deadline = time.monotonic() + seconds
    while fewest and time.monotonic() < deadline:
        busy, threads = front.busy_threads()
        fewest = min(fewest, busy)
    return fewest, threads


def run(case: Case, project: dict[str, str], tmp: Path, window: float) -> str:
    with running_front(case, project, tmp) as front, entry(case, front, tmp) as port:
        fetch_page(port)  # warm-up: the first page loads templates
        with SlowClients(port, case.slow, "bench", interval=case.interval, reconnect=True) as slow:
            pages: list[float] = []
            waited = None
            deadline = time.monotonic() + window
            while (left := deadline - time.monotonic()) > 0:
                asked = time.monotonic()
                try:
                    pages.append(fetch_page(port, timeout=max(left, 1.0)))
                except Starved:
                    waited = time.monotonic() - asked
                    break
            held, threads = held_threads(front)
            cut = [c.closed_after for c in slow.connections if c.closed_after is not None]
    if 0 < len(pages) <= 5:
        answered = f"{len(pages)} pages, in " + ", ".join(f"{p * 1000:.0f}" for p in pages) + " ms"
    elif pages:
        pages.sort()
        answered = (
            f"{len(pages)} pages, median {pages[len(pages) // 2] * 1000:.0f} ms, slowest {pages[-1] * 1000:.0f} ms"
        )
    else:
        answered = "0 pages"
    if waited is not None:
        answered += f", then no answer for {waited:.1f} s"
    if cut:
        cut_text = f"{len(cut)} slow connections cut (after {min(cut):.1f}-{max(cut):.1f} s) and replaced"
    else:
        cut_text = "no slow connection cut"
    return f"{case.describe()}\n    {answered}; {cut_text}; front threads held by them: {held} of {threads}"


def main() -> None:
    names = [c.name for c in CASES]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", metavar="CASE", help="cases to run (default: all): " + ", ".join(names))
    parser.add_argument("--window", type=float, default=WINDOW, help=f"seconds of page fetches (default {WINDOW:g})")
    args = parser.parse_args()
    unknown = set(args.cases) - set(names)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}: choose among {', '.join(names)}")
    chosen = [c for c in CASES if not args.cases or c.name in args.cases]
    with tempfile.TemporaryDirectory(prefix="slow-clients-") as name:
        tmp = Path(name)
        redis = start_redis(tmp)
        try:
            project = prepare_project(tmp, redis.url)
            print(f"each case: {args.window:g} s of page fetches while the slow connections run")
            for case in chosen:
                print(run(case, project, tmp, args.window), flush=True)
        finally:
            stop(redis.proc, signal.SIGTERM)


if __name__ == "__main__":
    main()
