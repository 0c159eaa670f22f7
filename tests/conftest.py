"""Fixtures with real parts: a private redis-server, the example project, uWSGI stacks.

Every wait polls a condition with a deadline; nothing sleeps for synchronisation.
Each test uses its own facility name, so tests do not see each other's messages.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "example"
BIN = Path(sys.executable).parent
UWSGI = BIN / "uwsgi"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

# The tests open more than a thousand sockets.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def ancestors(pid: int) -> list[int]:
    """Return the parent, grandparent... of a process, up to init."""
    chain = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            break
        chain.append(pid)
    return chain


def descendants(root: int) -> list[int]:
    """Return the processes below ``root`` (a process this suite started)."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and root in ancestors(int(e))]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def rss_kb(pids: list[int]) -> int:
    """Return the summed resident set size of ``pids`` in KiB (VmRSS of /proc/<pid>/status)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 15.0) -> None:
    """Stop a process this suite started, by its id."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --------------------------------------------------------------------------- Redis


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen
    url: str = ""

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(port=self.port)

    def worker_connections(self) -> dict[int, dict[str, int]]:
        """Count the connections of each websocket worker: {pid: {"hub": n, "pool": n}}.

        Workers name their connections ``django_ws:hub:<pid>`` and ``django_ws:pool:<pid>``.
        """
        counts: dict[int, dict[str, int]] = {}
        for c in self.client().client_list():
            parts = c.get("name", "").split(":")
            if len(parts) == 3 and parts[0] == "django_ws" and parts[1] in ("hub", "pool"):
                per = counts.setdefault(int(parts[2]), {"hub": 0, "pool": 0})
                per[parts[1]] += 1
        return counts


def start_redis(tmp: Path, port: int | None = None, *extra: str) -> RedisServer:
    """Start a private redis-server (on a free port unless given) that keeps nothing on disk."""
    port = port or free_port()
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command += ["--dir", str(tmp), "--maxclients", "20000", *extra]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, preexec_fn=_raise_fd_limit)
    server = RedisServer(port, proc, f"redis://127.0.0.1:{port}/0")
    wait_for(lambda: port_open(port), what="redis-server")
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop(server.proc, signal.SIGTERM)


@pytest.fixture(autouse=True)
def _fresh_rate_buckets(request):
    """Empty the per-client publish buckets after each test that used the shared Redis:
    the suite's users (alice, bob, carol) publish in many tests, which must not
    inherit each other's rate limit."""
    yield
    if "redis_server" in request.fixturenames:
        client = request.getfixturevalue("redis_server").client()
        keys = list(client.scan_iter("{ws:rate:*"))
        if keys:
            client.delete(*keys)


# --------------------------------------------------------------------------- Django


# What the example project allows (its DJANGO_WS["FACILITIES"]) besides "chat": the
# facility fixture's names (and names built on them), and the fixed ones of some tests.
TEST_FACILITIES = ("t" + "[0-9a-f]" * 12 + "*", "f", "helpers", "restart", "reload", "keepalive")


@dataclass
class Project:
    env: dict[str, str]
    users: dict[str, Any] = field(default_factory=dict)

    def cookie(self, username: str) -> str:
        """Log ``username`` in and return its session key."""
        from django.test import Client

        client = Client()
        client.force_login(self.users[username])
        return client.cookies["sessionid"].value

    @staticmethod
    def anonymous_session() -> str:
        from django.contrib.sessions.backends.db import SessionStore

        store = SessionStore()
        store["visited"] = True
        store.create()
        return store.session_key


@pytest.fixture(scope="session")
def project(redis_server, tmp_path_factory):
    """The example project, configured in this process and ready for the servers."""
    db = tmp_path_factory.mktemp("db") / "db.sqlite3"
    env = {
        "DJANGO_SETTINGS_MODULE": "chat.settings",
        "EXAMPLE_DB": str(db),
        "DJANGO_WS_REDIS_URL": redis_server.url,
        "DJANGO_WS_SECRET": secrets.token_hex(16),
        "EXAMPLE_FACILITIES": ",".join(TEST_FACILITIES),
    }
    os.environ.update(env)
    sys.path.insert(0, str(EXAMPLE))
    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    red = Group.objects.create(name="red")
    blue = Group.objects.create(name="blue team")
    users = {}
    for name, groups in (("alice", [red]), ("bob", [blue]), ("carol", [blue])):
        user = User.objects.create_user(name, password="pw")
        user.groups.set(groups)
        users[name] = user
    return Project(env=env, users=users)


# --------------------------------------------------------------------------- uWSGI


def unix_socket_open(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


@dataclass
class Stack:
    mode: str
    port: int
    ws_port: int | None  # the websocket instance's TCP port, if it has one
    procs: list[subprocess.Popen]
    log: Path
    ws_socket: str | None = None  # the websocket instance's unix socket, if it has one
    host: str = "127.0.0.1"  # the front's address

    def url(self, path: str) -> str:
        return f"ws://{self.host}:{self.port}{path}"

    def http(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def ws_connect(self, timeout: float = 10.0) -> socket.socket:
        """Connect to the websocket instance itself, as the front's offload thread does."""
        if self.ws_socket is not None:
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(timeout)
            conn.connect(self.ws_socket)
            return conn
        assert self.ws_port is not None, "this stack has no websocket instance"
        return socket.create_connection(("127.0.0.1", self.ws_port), timeout=timeout)


def private_dir(parent: Path, name: str = "run") -> Path:
    """Make a directory only this user may enter (mode 0700), as the hand-over socket needs."""
    path = parent / name
    path.mkdir(mode=0o700)
    path.chmod(0o700)  # whatever the umask
    return path


def start_stack(
    mode: str,
    project: Project,
    tmp: Path,
    *,
    root: Path = ROOT,
    bin_dir: Path = BIN,
    host: str = "127.0.0.1",
    port: int | None = None,
    wrap: list[str] | None = None,
    reachable: Callable[[int], bool] = port_open,
    **extra: str,
) -> Stack:
    """Start a server: "offload" (front + websocket instance), "single" (one gevent
    uWSGI) or "runserver" (Django's development server).

    The offload stack's websocket instance listens on a unix socket in a private
    directory under ``tmp``, as the ini's default does; ``DJANGO_WS_OFFLOAD_TO`` in
    ``extra`` puts it elsewhere (``127.0.0.1:<port>`` for TCP). ``root`` (the directory
    of the ini and of ``example/``) and ``bin_dir`` (the virtualenv's bin, with python
    and uwsgi) default to this checkout and its virtualenv. On another host (see
    tests/lab.py) the command runs under ``wrap``, the front listens on ``host``,
    and ``reachable(port)`` tells when it answers.
    """
    port = port or free_port()
    env = {
        **os.environ,
        **project.env,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "DJANGO_WS_HTTP": f"{host}:{port}",
        "DJANGO_WS_PROCESSES": "1",
        "DJANGO_WS_THREADS": "1",
        "DJANGO_WS_ASYNC": "3000",
        "DJANGO_WS_WORKERS": "1",
        "DJANGO_WS_POOL_SIZE": "4",
        "DJANGO_DEBUG": "0",  # as in production: no debug pages
        **extra,
    }
    unix_socket: str | None = None
    ws_port: int | None = None
    if mode == "offload":
        if "DJANGO_WS_OFFLOAD_TO" not in extra:
            env["DJANGO_WS_OFFLOAD_TO"] = str(private_dir(tmp, f"run-{port}") / "ws.sock")
        address = env["DJANGO_WS_OFFLOAD_TO"]
        if address.startswith("/"):
            unix_socket = address
        else:
            ws_port = int(address.rsplit(":", 1)[1])
    log = tmp / f"server-{mode}.log"
    if mode == "runserver":
        python = sys.executable if bin_dir == BIN else str(bin_dir / "python")
        command = [python, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"]
        cwd = root / "example"
    else:
        # The listen queue (1024) and everything else come from the ini, as documented.
        section = "uwsgi.ini.example" if mode == "offload" else "uwsgi.ini.example:single"
        command = [str(bin_dir / "uwsgi"), "--ini", section]
        cwd = root
    proc = subprocess.Popen(
        [*(wrap or []), *command],
        cwd=cwd,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=_raise_fd_limit,
    )
    stack = Stack(mode, port, ws_port, [proc], log, unix_socket, host)
    try:
        wait_for(lambda: proc.poll() is None and reachable(port), what=f"{mode} server", timeout=30)
        if unix_socket:
            wait_for(lambda: unix_socket_open(unix_socket), what="websocket instance", timeout=30)
        elif ws_port:
            wait_for(lambda: reachable(ws_port), what="websocket instance", timeout=30)
    except TimeoutError:
        stop(proc)
        raise RuntimeError(f"{mode} server did not start; log:\n{log.read_text()[-3000:]}") from None
    return stack


@pytest.fixture(scope="session", params=["offload", "single", "runserver"])
def stack(request, project, tmp_path_factory):
    stack = start_stack(request.param, project, tmp_path_factory.mktemp(request.param))
    yield stack
    for proc in stack.procs:
        stop(proc)


@pytest.fixture(scope="session")
def offload_stack(project, tmp_path_factory):
    stack = start_stack("offload", project, tmp_path_factory.mktemp("offload1"))
    yield stack
    for proc in stack.procs:
        stop(proc)


@pytest.fixture
def facility() -> str:
    return "t" + uuid.uuid4().hex[:12]


# --------------------------------------------------------------------------- client


class WS:
    """A real websocket client (websocket-client) with helpers to read typed frames."""

    def __init__(self, url: str, *, session: str | None = None, timeout: float = 10.0, **options: Any) -> None:
        import websocket

        headers = [f"Cookie: sessionid={session}"] if session else []
        self.conn = websocket.create_connection(url, header=headers, timeout=timeout, **options)

    def next(self) -> dict[str, Any]:
        """Return the next frame (heartbeats skipped) as a dict; binary data under "data"."""
        import websocket

        from uwsgi_ws.protocol import parse_binary_message

        while True:
            opcode, data = self.conn.recv_data()
            if opcode == websocket.ABNF.OPCODE_TEXT:
                frame = json.loads(data)
                if frame.get("type") == "heartbeat":
                    continue
                return frame
            if opcode == websocket.ABNF.OPCODE_BINARY:
                header, payload = parse_binary_message(data)
                header["data"] = payload
                header["binary"] = True
                return header
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                raise AssertionError(f"the server closed the websocket: {code} {data[2:]!r}")
            raise AssertionError(f"unexpected opcode {opcode}")

    def ready(self) -> list[dict[str, Any]]:
        """Read until the "ready" frame; return the frames before it."""
        frames = []
        while True:
            frame = self.next()
            if frame["type"] == "ready":
                return frames
            frames.append(frame)

    def until(self, marker: Any) -> list[Any]:
        """Return the data of the messages received before the message ``marker``."""
        seen = []
        while True:
            frame = self.next()
            if frame["type"] != "message":
                continue
            if frame["data"] == marker:
                return seen
            seen.append(frame["data"])

    def send(self, data: str | bytes) -> None:
        import websocket

        if isinstance(data, bytes):
            self.conn.send(data, opcode=websocket.ABNF.OPCODE_BINARY)
        else:
            self.conn.send(data)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def connect(stack, facility):
    """Open websockets to ``facility`` on the stack under test; closed after the test."""
    opened: list[WS] = []

    def open_(query: str, *, session: str | None = None, path: str | None = None, **options: Any) -> WS:
        ws = WS(stack.url(path or f"/ws/{facility}?{query}"), session=session, **options)
        opened.append(ws)
        return ws

    yield open_
    for ws in opened:
        try:
            ws.close()
        except Exception:
            pass


@pytest.fixture
def ws_settings(project):
    """Change DJANGO_WS keys in this process for one test: ``ws_settings(HISTORY_TTL=1)``."""
    from django.conf import settings
    from django.test import override_settings

    overrides = []

    def change(**values: Any) -> None:
        override = override_settings(DJANGO_WS={**settings.DJANGO_WS, **values})
        override.enable()
        overrides.append(override)

    yield change
    for override in reversed(overrides):
        override.disable()


def many_waiting_for_a_small_pool(client: Any, threads: int = 8, hold: float = 0.3) -> list[BaseException]:
    """Let ``threads`` threads each hold one of the client's connections for ``hold``
    seconds at once (a blocking pop that times out); return the errors they met."""
    import threading

    errors: list[BaseException] = []

    def hold_one(i: int) -> None:
        try:
            client.blpop(["{pool-test}:nothing-" + str(i)], timeout=hold)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    workers = [threading.Thread(target=hold_one, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    return errors
