"""Run uwsgi.ini.example the way the documentation says, and look at what it really produces.

Every process of a run carries a mark in its environment (inherited by the front's
workers and by the websocket instance it starts), so a test can find all of them,
read their environment from /proc, and prove that none is left afterwards, even
once the front has exited and its children would have been reparented.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import EXAMPLE, ROOT, UWSGI, cmdline, free_port, port_open, unix_socket_open, wait_for

MARK = "DJANGO_WS_TEST_RUN"
INI = ROOT / "uwsgi.ini.example"
# Lines the servers log when they refuse their configuration (never a traceback line).
REFUSAL_PREFIXES = ("django_ws cannot start: ", "websocket instance not started: ")


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process was started with (what the ini really gave it)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:  # gone, or not ours to read
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def marked(mark: str) -> list[int]:
    """Every live process whose environment carries ``mark`` (processes a test started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and environ_of(int(entry)).get(MARK) == mark:
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":  # a zombie holds nothing; its parent reaps it
                pids.append(int(entry))
    return pids


def ini_copy(tmp: Path) -> Path:
    """A verbatim copy of the ini in ``tmp`` (the tutorial says to copy it into a project).

    Its default hand-over directory is named after the file's path, so a copy gives a
    test a default directory of its own instead of the one this checkout's demo uses.
    """
    copy = tmp / "uwsgi.ini.example"
    shutil.copyfile(INI, copy)
    return copy


def readme_env(*, redis_url: str, secret: str | None, **extra: str) -> dict[str, str]:
    """The documented environment for ``uwsgi --ini uwsgi.ini.example`` (and nothing inherited).

    DJANGO_WS_SECRET and DJANGO_WS_REDIS_URL as the documentation sets them, a free port for
    the front, and small worker counts; ``secret=None`` leaves the secret out. No
    DJANGO_WS_* or UWSGI_* variable of the test process leaks in.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_WS_", "UWSGI_", "DJANGO_SETTINGS"))}
    env.update(
        {
            "DJANGO_WS_REDIS_URL": redis_url,
            "DJANGO_WS_HTTP": f"127.0.0.1:{free_port()}",
            "DJANGO_WS_PROJECT_DIR": str(EXAMPLE),
            "DJANGO_WS_PROCESSES": "1",
            "DJANGO_WS_THREADS": "1",
            "DJANGO_WS_ASYNC": "100",
            "DJANGO_DEBUG": "0",
        }
    )
    if secret is not None:
        env["DJANGO_WS_SECRET"] = secret
    env.update(extra)
    return env


@dataclass
class IniRun:
    """One ``uwsgi --ini <ini>[:section]`` started by a test."""

    proc: subprocess.Popen
    log: Path
    mark: str
    env: Mapping[str, str]

    @property
    def port(self) -> int:
        return int(self.env["DJANGO_WS_HTTP"].rsplit(":", 1)[1])

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def refusals(self) -> list[str]:
        """The lines in which a server refused its configuration."""
        return [line for line in self.text().splitlines() if line.startswith(REFUSAL_PREFIXES)]

    def processes(self) -> list[int]:
        return marked(self.mark)

    def websocket_instance(self) -> list[int]:
        """The websocket instance's master and workers."""
        return [pid for pid in self.processes() if ":websocket" in cmdline(pid)]

    def websocket_environ(self, timeout: float = 60) -> dict[str, str]:
        """The environment the websocket instance's master was started with."""
        pids = wait_for(self.websocket_instance, timeout=timeout, what="the websocket instance")
        return environ_of(pids[0])

    def websocket_listening(self, timeout: float = 60) -> str:
        """Wait until the websocket instance accepts connections; return its address."""
        address = self.websocket_environ(timeout)["DJANGO_WS_OFFLOAD_TO"]
        if address.startswith("/"):
            wait_for(lambda: unix_socket_open(address), timeout=timeout, what=f"a listener at {address}")
        else:
            wait_for(lambda: port_open(int(address.rsplit(":", 1)[1])), timeout=timeout, what=address)
        return address

    def wait_serving(self, timeout: float = 60) -> None:
        wait_for(lambda: self.proc.poll() is None and port_open(self.port), timeout=timeout, what="the front")

    def wait_exit(self, timeout: float = 60) -> int:
        """Wait until the command ends by itself; return its status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s; log:\n{self.text()[-3000:]}") from None

    def stop(self) -> None:
        """Stop the run (SIGINT, as Ctrl-C), then whatever of it is left, by pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        try:
            wait_for(lambda: not self.processes(), timeout=15, what="the run's processes to end")
        except TimeoutError:
            for pid in self.processes():  # only processes carrying this run's mark
                os.kill(pid, signal.SIGKILL)


def start(ini: Path | str, env: Mapping[str, str], tmp: Path, *, section: str = "") -> IniRun:
    """Start ``uwsgi --ini <ini>[:section]`` with ``env``, logging to a file in ``tmp``."""
    mark = uuid.uuid4().hex
    log = tmp / f"uwsgi-{mark[:8]}.log"
    target = f"{ini}:{section}" if section else str(ini)
    proc = subprocess.Popen(
        [str(UWSGI), "--ini", target],
        cwd=ROOT,
        env={**env, MARK: mark},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    return IniRun(proc, log, mark, env)
