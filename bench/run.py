"""Benchmark: our stack (uWSGI offload + gevent websocket instance + Redis) against
Django Channels 4 + channels_redis + Daphne, same load generator, same Redis, one
after the other.

    .venv/bin/python bench/run.py            # full: N = 1000, 5000, 10000 (make bench)
    .venv/bin/python bench/run.py --quick    # N = 200, one round (make bench-quick)
    .venv/bin/python bench/run.py --only ours --n 100 --quick --no-report   # the test

For each system and N: start the server fresh, open N websockets at bounded
parallelism (each subscribed to the broadcast channel and to a channel of its own),
measure the idle server, publish timestamped broadcast rounds from a separate
process, then a targeted mix (RATE messages/s, each to one connection, for SECONDS),
and stop everything. Writes bench/results/<timestamp>.json, then (unless
--no-report) regenerates BENCHMARKS.md and the plots with bench/report.py.

Everything runs on 127.0.0.1; every process started here is stopped by its pid;
every phase has a deadline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
EXAMPLE = ROOT / "example"
BIN = Path(sys.executable).parent
UWSGI = BIN / "uwsgi"
PEER_VENV = BENCH / ".venv-channels"
# redis-py 8 breaks channels_redis 4.3 (django/channels_redis#422): its new 5 s default
# socket timeout aborts the layer's blocking BZPOPMIN, the consumer dies with
# "Timeout reading from ..." (close 1011) and messages are lost; its new default pool
# cap of 100 connections also fails handshakes ("Too many connections"). Pinned below 8.
PEER_REQUIREMENTS = ["channels>=4,<5", "channels-redis>=4,<5", "daphne>=4,<5", "django>=5.2,<5.3", "redis>=5,<8"]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = 4096
T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


raise_fd_limit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def descendants(root: int) -> list[int]:
    """The processes below ``root`` (a process started here)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = parent_of(int(entry))
            if parent is not None:
                parents[int(entry)] = parent
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / CLK_TCK


def memory_kb(pids: list[int]) -> dict[str, int]:
    """Sum of RSS (VmRSS) and of PSS (shared pages split between sharers) in KiB."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return {"rss_kb": rss, "pss_kb": pss}


def fd_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except (FileNotFoundError, PermissionError):
            pass
    return total


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 20.0) -> None:
    """Stop a process started here, by its pid."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Pipe:
    """A child speaking JSON lines on stdin/stdout; a thread reads its answers."""

    def __init__(
        self,
        name: str,
        command: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stderr: Any = None,
    ) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            cwd=cwd,
            text=True,
            bufsize=1,
            preexec_fn=raise_fd_limit,
        )
        self.lines: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    def send(self, document: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(document) + "\n")
        self.proc.stdin.flush()

    def next_event(self, timeout: float) -> dict:
        try:
            item = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no answer within {timeout:.0f}s") from None
        if item is None:
            raise RuntimeError(f"{self.name} exited with {self.proc.wait()}")
        return item

    def wait_event(self, kind: str, timeout: float, on_progress: Any = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.1, deadline - time.monotonic()))
            if event.get("event") == kind:
                return event
            if event.get("event") == "progress" and on_progress:
                on_progress(self, event)

    def call(self, document: dict, timeout: float) -> dict:
        self.send(document)
        return self.wait_event("done", timeout)

    def close(self) -> None:
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        stop(self.proc, signal.SIGTERM, timeout=10)


def call_all(pipes: list[Pipe], documents: list[dict], timeout: float, on_progress: Any = None) -> list[dict]:
    """Send one command to each pipe and wait for every answer, passing progress on."""
    for pipe, document in zip(pipes, documents, strict=True):
        pipe.send(document)
    answers: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(answers) < len(pipes):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer within {timeout:.0f}s from {[p.name for p in pipes]}")
        for j, pipe in enumerate(pipes):
            if j in answers:
                continue
            try:
                event = pipe.next_event(0.05)
            except TimeoutError:
                continue
            if event.get("event") == "done":
                answers[j] = event
            elif event.get("event") == "progress" and on_progress:
                on_progress(pipe, event)
    return [answers[j] for j in range(len(pipes))]


# --------------------------------------------------------------------------- Redis


class Redis:
    def __init__(self, tmp: Path) -> None:
        import redis

        self.port = free_port()
        command = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
            "--maxclients",
            "20000",
        ]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, preexec_fn=raise_fd_limit)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        wait_for(lambda: port_open(self.port), 20, "redis-server")
        self.client = redis.Redis(port=self.port, client_name="bench:monitor")
        self.version = self.client.info("server")["redis_version"]

    def clients(self) -> dict[str, Any]:
        """Connections other than this monitor, by name."""
        names: dict[str, int] = {}
        for c in self.client.client_list():
            if c.get("name") == "bench:monitor":
                continue
            name = c.get("name") or "(unnamed)"
            name = ":".join(name.split(":")[:2]) if name.startswith("django_ws:") else name
            names[name] = names.get(name, 0) + 1
        return {"total": sum(names.values()), "by_name": names}

    def flush(self) -> None:
        self.client.flushall()

    def stop(self) -> None:
        self.client.close()
        stop(self.proc, signal.SIGTERM)


# --------------------------------------------------------------------------- the systems


class Ours:
    name = "ours"
    label = "django-uwsgi-ws (uWSGI offload + gevent)"

    def __init__(self, args: argparse.Namespace, redis: Redis, tmp: Path) -> None:
        self.args = args
        self.redis = redis
        self.tmp = tmp
        self.db = tmp / "example.sqlite3"
        self.keys_file = tmp / "sessions.json"
        self.secret = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.ws_port = 0
        self.keys: list[str] = []

    def base_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "DJANGO_SETTINGS_MODULE": "chat.settings",
            "EXAMPLE_DB": str(self.db),
            "DJANGO_WS_REDIS_URL": self.redis.url,
            "DJANGO_WS_SECRET": self.secret,
            "DJANGO_DEBUG": "0",
            "EXAMPLE_FACILITIES": "bench",  # the example allows its own facilities only
        }

    def prepare(self, max_n: int) -> None:
        log(f"ours: migrating the example database and creating {max_n} sessions")
        subprocess.run(
            [sys.executable, str(BENCH / "prepare_ours.py"), str(max_n), str(self.keys_file)],
            env=self.base_env(),
            cwd=EXAMPLE,
            check=True,
            timeout=300,
        )
        self.keys = json.loads(self.keys_file.read_text())

    def start(self) -> None:
        self.port, self.ws_port = free_port(), free_port()
        if self.args.offload_to == "unix":
            self.ws_socket: str | None = str(self.tmp / f"ws-{self.ws_port}.sock")
            offload_to = self.ws_socket
        else:
            self.ws_socket = None
            offload_to = f"127.0.0.1:{self.ws_port}"
        env = {
            **self.base_env(),
            "DJANGO_WS_HTTP": f"127.0.0.1:{self.port}",
            "DJANGO_WS_OFFLOAD_TO": offload_to,
            "DJANGO_WS_ASYNC": str(self.args.async_cores),
            "DJANGO_WS_WORKERS": str(self.args.workers),
            "DJANGO_WS_PROCESSES": str(self.args.front_processes),
            "DJANGO_WS_THREADS": str(self.args.front_threads),
            # the listen queue of both instances (the websocket instance reads it
            # from the environment too): the default 100 drops SYNs under a burst
            "UWSGI_LISTEN": str(self.args.listen),
        }
        self.log = self.tmp / f"ours-{self.port}.log"
        command = [str(UWSGI), "--ini", "uwsgi.ini.example"]
        if self.args.offload_threads:
            command += ["--offload-threads", str(self.args.offload_threads)]  # overrides the ini's value
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, preexec_fn=raise_fd_limit
        )
        try:
            wait_for(lambda: self.proc.poll() is None and port_open(self.port), 60, "the front instance")
            wait_for(self.ws_listening, 60, "the websocket instance")
            wait_for(lambda: len(self.ws_workers()) >= self.args.workers, 30, "the websocket workers")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"our stack did not start; log:\n{self.log.read_text()[-3000:]}") from None

    def ws_listening(self) -> bool:
        if self.ws_socket is None:
            return port_open(self.ws_port)
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(self.ws_socket)
            except OSError:
                return False
            return True

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *descendants(self.proc.pid)]

    def ws_pids(self) -> list[int]:
        return [p for p in self.pids() if "uwsgi.ini.example:websocket" in cmdline(p)]

    def ws_workers(self) -> list[int]:
        """The websocket instance's workers (its master is their parent)."""
        ws = self.ws_pids()
        return [p for p in ws if parent_of(p) in ws]

    def groups(self) -> dict[str, list[int]]:
        everything = self.pids()
        ws = self.ws_pids()
        return {"all": everything, "websocket_instance": ws, "front": [p for p in everything if p not in ws]}

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/bench?subscribe-broadcast&subscribe-session"

    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cookies(self, lo: int, hi: int) -> list[str] | None:
        return self.keys[lo:hi]

    def publisher(self) -> Pipe:
        return Pipe(
            "publisher(ours)",
            [sys.executable, str(BENCH / "publish_ours.py"), str(self.keys_file)],
            env=self.base_env(),
            cwd=EXAMPLE,
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGINT, timeout=30)
            self.proc = None

    def versions(self) -> dict[str, str]:
        out = subprocess.run(
            [sys.executable, "-c", VERSIONS, "uwsgi", "gevent", "redis", "hiredis", "django", "django-uwsgi-ws"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(out.stdout or "{}")


class Channels:
    name = "channels"
    label = "Django Channels 4 + channels_redis + Daphne"

    def __init__(self, args: argparse.Namespace, redis: Redis, tmp: Path) -> None:
        self.args = args
        self.redis = redis
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.python = PEER_VENV / "bin" / "python"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "peer_settings",
            "BENCH_REDIS_URL": self.redis.url,
            "PYTHONPATH": str(BENCH / "peer"),
        }

    def prepare(self, max_n: int) -> None:
        ensure_peer_venv()

    def start(self) -> None:
        self.port = free_port()
        self.log = self.tmp / f"channels-{self.port}.log"
        endpoint = f"tcp:port={self.port}:interface=127.0.0.1:backlog={self.args.listen}"
        self.proc = subprocess.Popen(
            [str(PEER_VENV / "bin" / "daphne"), "-e", endpoint, "asgi:application"],
            cwd=BENCH / "peer",
            env=self.env(),
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            preexec_fn=raise_fd_limit,
        )
        try:
            wait_for(lambda: self.proc.poll() is None and port_open(self.port), 60, "daphne")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"daphne did not start; log:\n{self.log.read_text()[-3000:]}") from None

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *descendants(self.proc.pid)]

    def groups(self) -> dict[str, list[int]]:
        return {"all": self.pids()}

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/bench?id={{i}}"

    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cookies(self, lo: int, hi: int) -> list[str] | None:
        return None

    def publisher(self) -> Pipe:
        return Pipe(
            "publisher(channels)",
            [str(self.python), str(BENCH / "publish_channels.py")],
            env=self.env(),
            cwd=BENCH / "peer",
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGINT, timeout=30)
            self.proc = None

    def versions(self) -> dict[str, str]:
        out = subprocess.run(
            [
                str(self.python),
                "-c",
                VERSIONS,
                "channels",
                "channels-redis",
                "daphne",
                "django",
                "twisted",
                "autobahn",
                "redis",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(out.stdout or "{}")


VERSIONS = """
import json, sys, importlib.metadata as m
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
print(json.dumps(found))
"""


# --------------------------------------------------------------------------- environment


def ensure_module(module: str, requirement: str, allow_install: bool) -> None:
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    if probe.returncode == 0:
        return
    if not allow_install:
        raise SystemExit(f"{module} is missing: {sys.executable} -m pip install '{requirement}'")
    log(f"installing {requirement} into {BIN.parent}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement], check=True, timeout=600)


def ensure_peer_venv() -> None:
    marker = PEER_VENV / ".bench-requirements"
    wanted = "\n".join(PEER_REQUIREMENTS)
    if (PEER_VENV / "bin" / "daphne").exists() and marker.exists() and marker.read_text() == wanted:
        return
    log(f"creating the peer's virtualenv {PEER_VENV.relative_to(ROOT)} (channels, channels-redis, daphne, django)")
    if not (PEER_VENV / "bin" / "python").exists():
        subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True, timeout=300)
    subprocess.run(
        [str(PEER_VENV / "bin" / "python"), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS], check=True, timeout=900
    )
    marker.write_text(wanted)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_mb": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


# --------------------------------------------------------------------------- measurement


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summary(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": max(values) if values else None,
        "count": len(values),
    }


def quantiles(values: list[float], points: int = 1000) -> list[float]:
    """The distribution in ``points`` quantiles (for the CDF plot), not every sample."""
    if not values:
        return []
    values = sorted(values)
    return [values[min(len(values) - 1, int(i * len(values) / points))] for i in range(points)] + [values[-1]]


def snapshot(system: Any, redis: Redis, clients: list[Pipe] = ()) -> dict[str, Any]:
    groups = system.groups()
    shot: dict[str, Any] = {
        "cpu_s": cpu_seconds(groups["all"]),
        "redis_cpu_s": cpu_seconds([redis.proc.pid]),
        "client_cpu_s": cpu_seconds([c.proc.pid for c in clients]),
    }
    for name, pids in groups.items():
        shot[name] = {**memory_kb(pids), "processes": len(pids), "fds": fd_count(pids), "cpu_s": cpu_seconds(pids)}
    shot["redis"] = memory_kb([redis.proc.pid])
    return shot


def profile(system: Any, loadgens: list[Pipe], publisher: Pipe, seconds: float, out: Path) -> dict[str, Any]:
    """Sample the websocket workers with py-spy while broadcasts go out back to back."""
    pyspy = BIN / "py-spy"
    if not pyspy.exists():
        return {"error": "py-spy not installed"}
    pids = system.ws_workers() if hasattr(system, "ws_workers") else system.pids()
    samplers = []
    for pid in pids:
        raw = out.with_name(f"{out.stem}-{pid}.txt")
        samplers.append(
            (
                raw,
                subprocess.Popen(
                    [
                        str(pyspy),
                        "record",
                        "--pid",
                        str(pid),
                        "--rate",
                        "250",
                        "--duration",
                        str(int(seconds)),
                        "--format",
                        "raw",
                        "--nonblocking",
                        "--output",
                        str(raw),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
            )
        )
    time.sleep(1.0)
    deadline = time.monotonic() + seconds - 1.5
    seq = 10_000
    while time.monotonic() < deadline:
        call_all(loadgens, [{"cmd": "arm"}] * len(loadgens), 30)
        publisher.call({"cmd": "broadcast", "seq": seq}, 30)
        call_all(loadgens, [{"cmd": "collect_broadcast", "seq": seq, "timeout": 20}] * len(loadgens), 60)
        seq += 1
    for _, sampler in samplers:
        try:
            sampler.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            stop(sampler, signal.SIGINT)
    # Collapsed stacks: "frame;frame;frame count". Sum self time by leaf frame and
    # inclusive time by any frame.
    leaf: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for raw, _ in samplers:
        if not raw.exists():
            continue
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + n
    top = lambda d: [[k, round(100 * v / total, 1)] for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:25]]  # noqa: E731
    return {
        "pids": pids,
        "samples": total,
        "rounds": seq - 10_000,
        "self_top": top(leaf) if total else [],
        "inclusive_top": top(inclusive) if total else [],
        "files": [str(r.relative_to(ROOT)) for r, _ in samplers],
    }


def run_one(system: Any, n: int, args: argparse.Namespace, redis: Redis, results_dir: Path, stamp: str) -> dict:
    result: dict[str, Any] = {"system": system.name, "n": n}
    log(f"{system.name} N={n}: starting the server")
    redis.flush()
    system.start()
    loadgens: list[Pipe] = []
    publisher: Pipe | None = None
    try:
        time.sleep(1.0)
        base = snapshot(system, redis)
        result["base"] = base
        k = max(1, math.ceil(n / args.per_client))
        bounds = [(n * j // k, n * (j + 1) // k) for j in range(k)]
        loadgens = [Pipe(f"loadgen{j}", [sys.executable, str(BENCH / "loadgen.py")]) for j in range(k)]
        for lg in loadgens:
            lg.wait_event("started", 30)
        progress: dict[str, tuple[int, int]] = {}
        last_print = [0.0]

        def on_progress(pipe: Pipe, event: dict) -> None:
            progress[pipe.name] = (event["done"], event["ok"])
            if time.monotonic() - last_print[0] >= 2:
                done = sum(d for d, _ in progress.values())
                ok = sum(o for _, o in progress.values())
                log(f"{system.name} N={n}: connecting {done}/{n} ({ok} established)")
                last_print[0] = time.monotonic()

        log(
            f"{system.name} N={n}: opening {n} websockets from {k} client process(es), "
            f"at most {args.parallel} handshakes at a time"
        )
        deadline = args.connect_deadline
        answers = call_all(
            loadgens,
            [
                {
                    "cmd": "connect",
                    "url": system.url(),
                    "lo": lo,
                    "hi": hi,
                    "cookies": system.cookies(lo, hi),
                    "origin": system.origin(),
                    "parallel": max(1, args.parallel // k),
                    "timeout": 30,
                    "deadline": deadline,
                }
                for lo, hi in bounds
            ],
            deadline + 60,
            on_progress,
        )
        handshakes = [t for a in answers for t in a["handshake_ms"]]
        errors: dict[str, int] = {}
        for a in answers:
            for e, c in a["errors"].items():
                errors[e] = errors.get(e, 0) + c
        established = sum(a["established"] for a in answers)
        connect_s = max(a["seconds"] for a in answers)
        result["connect"] = {
            "attempted": n,
            "established": established,
            "failed": n - established,
            "seconds": connect_s,
            "rate_per_s": established / connect_s if connect_s else None,
            "handshake_ms": summary(handshakes),
            "errors": errors,
            "client_processes": k,
        }
        log(
            f"{system.name} N={n}: {established}/{n} established in {connect_s:.1f}s"
            + (f"; errors: {errors}" if errors else "")
        )
        if established == 0:
            raise RuntimeError("no connection could be established")

        time.sleep(args.settle)
        idle = snapshot(system, redis)
        result["idle"] = idle
        result["redis_clients"] = redis.clients()
        per_conn = {}
        for group in base:
            if isinstance(base[group], dict) and "rss_kb" in base[group] and group != "redis":
                per_conn[group] = {
                    "rss_kb": (idle[group]["rss_kb"] - base[group]["rss_kb"]) / established,
                    "pss_kb": (idle[group]["pss_kb"] - base[group]["pss_kb"]) / established,
                }
        result["per_connection"] = per_conn
        log(
            f"{system.name} N={n}: idle server RSS {idle['all']['rss_kb'] / 1024:.1f} MiB "
            f"({per_conn['all']['rss_kb']:.1f} KiB per connection); "
            f"Redis connections: {result['redis_clients']['total']}"
        )

        publisher = system.publisher()
        publisher.wait_event("ready", 60)

        # ------------------------------------------------------------- broadcast rounds
        rounds = []
        cpu0 = snapshot(system, redis, loadgens)
        for r in range(1, args.rounds + 1):
            call_all(loadgens, [{"cmd": "arm"}] * k, 30)
            pub = publisher.call({"cmd": "broadcast", "seq": r}, 60)
            got = call_all(
                loadgens,
                [{"cmd": "collect_broadcast", "seq": r, "timeout": args.round_timeout}] * k,
                args.round_timeout + 30,
            )
            lat = [x for g in got for x in g["latency_ms"]]
            received = sum(g["received"] for g in got)
            lasts = [g["last"] for g in got if g["last"]]
            span = (max(lasts) - pub["t"]) if lasts else None
            rounds.append(
                {
                    "seq": r,
                    "expected": sum(g["expected"] for g in got),
                    "received": received,
                    "lost": sum(g["lost"] for g in got),
                    "duplicates": sum(g["duplicates"] for g in got),
                    "stray": sum(g["stray"] for g in got),
                    "publish_call_ms": pub["call_ms"],
                    "receivers": pub["receivers"],
                    "span_s": span,
                    "over_capacity": pub.get("over_capacity"),
                    "deliveries_per_s": received / span if span else None,
                    "latency_ms": summary(lat),
                    "_lat": lat,
                }
            )
            log(
                f"{system.name} N={n}: broadcast {r}/{args.rounds}: {received}/{rounds[-1]['expected']} delivered, "
                f"p50 {rounds[-1]['latency_ms']['p50']} ms, p99 {rounds[-1]['latency_ms']['p99']} ms, "
                f"last after {span and span * 1000:.0f} ms"
            )
            time.sleep(args.pause)
        cpu1 = snapshot(system, redis, loadgens)
        all_lat = [x for r in rounds for x in r.pop("_lat")]
        delivered = sum(r["received"] for r in rounds)
        spans = [r["span_s"] for r in rounds if r["span_s"]]
        cpu = cpu1["cpu_s"] - cpu0["cpu_s"]
        result["broadcast"] = {
            "rounds": rounds,
            "expected": sum(r["expected"] for r in rounds),
            "delivered": delivered,
            "lost": sum(r["lost"] for r in rounds),
            "duplicates": sum(r["duplicates"] for r in rounds),
            "latency_ms": summary(all_lat),
            "deliveries_per_s": delivered / sum(spans) if spans else None,
            "server_cpu_s": cpu,
            "redis_cpu_s": cpu1["redis_cpu_s"] - cpu0["redis_cpu_s"],
            "cpu_s_per_100k": cpu / delivered * 100_000 if delivered else None,
            "redis_cpu_s_per_100k": (cpu1["redis_cpu_s"] - cpu0["redis_cpu_s"]) / delivered * 100_000
            if delivered
            else None,
            "client_cpu_s": cpu1["client_cpu_s"] - cpu0["client_cpu_s"],
            "cpu_s_by_group": {g: cpu1[g]["cpu_s"] - cpu0[g]["cpu_s"] for g in system.groups()},
            "latency_quantiles_ms": quantiles(all_lat),
        }
        result["after_broadcast"] = cpu1

        # ------------------------------------------------------------- targeted mix
        if args.targeted_seconds > 0:
            call_all(loadgens, [{"cmd": "arm"}] * k, 30)
            log(
                f"{system.name} N={n}: targeted mix, {args.targeted_rate:.0f} messages/s for "
                f"{args.targeted_seconds:.0f}s, each to one connection"
            )
            c0 = snapshot(system, redis, loadgens)
            pub = publisher.call(
                {"cmd": "targeted", "n": n, "rate": args.targeted_rate, "seconds": args.targeted_seconds},
                args.targeted_seconds * 2 + 60,
            )
            got = call_all(
                loadgens,
                [{"cmd": "collect_targeted", "sent": pub["sent"], "n": n, "timeout": args.round_timeout}] * k,
                args.round_timeout + 30,
            )
            c1 = snapshot(system, redis, loadgens)
            lat = [x for g in got for x in g["latency_ms"]]
            received = sum(g["received"] for g in got)
            firsts = [g["first"] for g in got if g["first"]]
            lasts = [g["last"] for g in got if g["last"]]
            span = max(lasts) - min(firsts) if lasts and firsts else None
            cpu = c1["cpu_s"] - c0["cpu_s"]
            result["targeted"] = {
                "sent": pub["sent"],
                "publish_rate": pub["rate"],
                "over_capacity": pub.get("over_capacity"),
                "publish_call_ms_p50": pub["call_ms_p50"],
                "publish_call_ms_p99": pub["call_ms_p99"],
                "expected": sum(g["expected"] for g in got),
                "delivered": received,
                "lost": sum(g["lost"] for g in got),
                "duplicates": sum(g["duplicates"] for g in got),
                "misdelivered": sum(g["misdelivered"] for g in got),
                "latency_ms": summary(lat),
                "deliveries_per_s": received / span if span else None,
                "server_cpu_s": cpu,
                "cpu_s_per_100k": cpu / received * 100_000 if received else None,
                "redis_cpu_s": c1["redis_cpu_s"] - c0["redis_cpu_s"],
                "client_cpu_s": c1["client_cpu_s"] - c0["client_cpu_s"],
                "cpu_s_by_group": {g: c1[g]["cpu_s"] - c0[g]["cpu_s"] for g in system.groups()},
            }
            t = result["targeted"]
            log(
                f"{system.name} N={n}: targeted: {received}/{t['expected']} delivered (sent {pub['sent']} at "
                f"{pub['rate']:.0f}/s), p50 {t['latency_ms']['p50']} ms, p99 {t['latency_ms']['p99']} ms"
                + (f"; the layer dropped {pub['over_capacity']} over capacity" if pub.get("over_capacity") else "")
            )

        if args.profile and system.name in args.profile and n == max(args.n):
            log(f"{system.name} N={n}: profiling the websocket workers with py-spy for {args.profile_seconds}s")
            result["profile"] = profile(
                system, loadgens, publisher, args.profile_seconds, results_dir / f"{stamp}-pyspy-{system.name}-{n}.txt"
            )
        status = call_all(loadgens, [{"cmd": "status"}] * k, 30)
        result["dropped_by_server"] = sum(s["dropped"] for s in status)
        close_codes: dict[str, int] = {}
        for s in status:
            for code, c in s["close_codes"].items():
                close_codes[code] = close_codes.get(code, 0) + c
        result["close_codes"] = close_codes
    except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on
        log(f"{system.name} N={n}: FAILED: {type(exc).__name__}: {exc}")
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for lg in loadgens:
            try:
                lg.call({"cmd": "close"}, 30)
            except Exception:  # noqa: BLE001
                pass
            lg.close()
        if publisher is not None:
            try:
                publisher.send({"cmd": "quit"})
            except OSError:
                pass
            publisher.close()
        system.stop()
        log(f"{system.name} N={n}: stopped")
    return result


# --------------------------------------------------------------------------- main


def get_lost(run: dict) -> int:
    return sum((run.get(phase) or {}).get("lost", 0) for phase in ("broadcast", "targeted"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=200, one round, 2 s of targeted mix")
    p.add_argument("--only", choices=["ours", "channels", "both"], default="both")
    p.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], help="connection counts, e.g. 1000,5000")
    p.add_argument("--rounds", type=int, help="broadcast rounds per N (default 10; quick 1)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between broadcast rounds")
    p.add_argument("--round-timeout", type=float, default=30.0)
    p.add_argument("--targeted-rate", type=float, default=1000.0)
    p.add_argument("--targeted-seconds", type=float, help="default 10; quick 2; 0 to skip")
    p.add_argument("--workers", type=int, default=1, help="websocket worker processes (ours)")
    p.add_argument("--async-cores", type=int, default=12000, help="DJANGO_WS_ASYNC (ours)")
    p.add_argument("--front-processes", type=int, default=2, help="front Django processes (ours)")
    p.add_argument("--front-threads", type=int, default=2)
    p.add_argument(
        "--offload-threads",
        type=int,
        default=0,
        help="offload threads per front process (ours; default: the ini's value, 8)",
    )
    p.add_argument(
        "--offload-to",
        choices=["tcp", "unix"],
        default="unix",
        help="how the front reaches the websocket instance (ours): a unix socket or loopback TCP",
    )
    p.add_argument("--listen", type=int, default=4096, help="listen backlog of the servers")
    p.add_argument("--parallel", type=int, default=100, help="handshakes in flight at a time")
    p.add_argument("--per-client", type=int, default=5000, help="connections per load generator process")
    p.add_argument("--connect-deadline", type=float, default=300.0, help="seconds for the whole connect phase")
    p.add_argument("--settle", type=float, default=2.0, help="seconds idle before measuring memory")
    p.add_argument(
        "--profile",
        nargs="*",
        choices=["ours", "channels"],
        help="py-spy the servers during extra broadcasts at the largest N",
    )
    p.add_argument("--profile-seconds", type=float, default=12.0)
    p.add_argument("--out", type=Path, default=BENCH / "results")
    p.add_argument("--no-report", action="store_true", help="do not regenerate BENCHMARKS.md and the plots")
    p.add_argument("--no-install", action="store_true", help="fail instead of pip-installing what is missing")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = [200] if args.quick else [1000, 5000, 10000]
    if args.rounds is None:
        args.rounds = 1 if args.quick else 10
    if args.targeted_seconds is None:
        args.targeted_seconds = 2.0 if args.quick else 10.0
    if args.quick:
        args.settle = min(args.settle, 1.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    systems_wanted = ["ours", "channels"] if args.only == "both" else [args.only]
    ensure_module("picows", "picows>=1.9", not args.no_install)
    ensure_module("redis", "redis>=5", not args.no_install)
    if args.profile and not (BIN / "py-spy").exists():
        if args.no_install:
            raise SystemExit("py-spy is missing")
        log(f"installing py-spy into {BIN.parent}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True, timeout=600)
    if not args.no_report:
        ensure_module("matplotlib", "matplotlib>=3.7", not args.no_install)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="django-ws-bench-"))
    log(
        f"benchmark {stamp}: systems {systems_wanted}, N {args.n}, {args.rounds} broadcast round(s), "
        f"targeted {args.targeted_rate:.0f}/s x {args.targeted_seconds:.0f}s; scratch {tmp}"
    )
    redis = Redis(tmp)
    document: dict[str, Any] = {
        "timestamp": stamp,
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "redis_version": redis.version,
        "systems": {},
        "runs": [],
    }
    try:
        for name in systems_wanted:
            system = (Ours if name == "ours" else Channels)(args, redis, tmp)
            system.prepare(max(args.n))
            document["systems"][name] = {"label": system.label, "versions": system.versions()}
            for n in args.n:
                document["runs"].append(run_one(system, n, args, redis, args.out, stamp))
    finally:
        redis.stop()
    failed = [r for r in document["runs"] if "error" in r]
    anomalies = [
        r for r in document["runs"] if r.get("connect", {}).get("failed") or r.get("dropped_by_server") or get_lost(r)
    ]
    if failed or anomalies:
        log(f"kept the server logs in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    path = args.out / f"{stamp}.json"
    path.write_text(json.dumps(document, indent=1))
    log(f"results: {path}")
    if not args.no_report:
        subprocess.run([sys.executable, str(BENCH / "report.py"), str(path)], check=True, timeout=300)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
