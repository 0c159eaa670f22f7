"""manage.py runserver serves websockets, restarts cleanly and stops on Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websocket

from tests.conftest import EXAMPLE, WS, free_port, port_open, wait_for


def _start(project, cwd: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", *extra],
        cwd=cwd,
        env={**os.environ, **project.env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, like a terminal's
    )


def _ctrl_c(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # the group of the process this test started


def test_startup_line_says_where_websockets_are(project, tmp_path):
    port = free_port()
    log = tmp_path / "runserver.log"
    proc = _start(project, EXAMPLE, port, log, "--noreload")
    try:
        wait_for(lambda: b"Websockets are served" in log.read_bytes(), what="startup line")
        assert f"Websockets are served at ws://127.0.0.1:{port}/ws/<facility>".encode() in log.read_bytes()
    finally:
        _ctrl_c(proc)
        proc.wait(15)


@pytest.mark.timeout(90)
def test_autoreload_with_open_websockets_then_ctrl_c(project, tmp_path):
    import django_ws

    copy = tmp_path / "example"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("*.sqlite3", "__pycache__"))
    port = free_port()
    log = tmp_path / "runserver.log"
    proc = _start(project, copy, port, log)
    try:
        wait_for(lambda: port_open(port), what="runserver", timeout=30)
        url = f"ws://127.0.0.1:{port}/ws/reload?subscribe-broadcast"
        ws = WS(url)
        ws.ready()
        django_ws.publish("reload", "before", broadcast=True)
        before = ws.next()

        # A code change: the autoreloader restarts the server while the websocket is open.
        # The reloader compares with the times it saw on its first scan, which may come
        # after a first change: change the file again until the server goes away.
        views = copy / "chat" / "views.py"
        ws.conn.settimeout(1.5)
        deadline = time.monotonic() + 30
        closed = False
        attempt = 0
        while not closed and time.monotonic() < deadline:
            attempt += 1
            later = time.time() + 10 * attempt
            views.write_text(views.read_text() + "\n# changed\n")
            os.utime(views, (later, later))
            try:
                while True:
                    ws.next()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
                closed = True
        assert closed, "the autoreloader did not restart the server"
        django_ws.publish("reload", "during restart", broadcast=True)

        def reconnect():
            try:
                return WS(url + f"&recover=%7B%22broadcast%22%3A%5B{before['offset']}%2C%22{before['epoch']}%22%5D%7D")
            except (OSError, websocket.WebSocketException):
                return None

        again = wait_for(reconnect, what="restarted runserver", timeout=30)
        frames = again.ready()
        assert [f["data"] for f in frames if f["type"] == "message"] == ["during restart"]
        assert frames[-1]["recovered"] is True
    finally:
        _ctrl_c(proc)
        started = time.monotonic()
        proc.wait(15)  # raises if Ctrl-C hangs with a websocket open
        assert time.monotonic() - started < 15
    assert b"Traceback" not in log.read_bytes(), log.read_text()[-3000:]
