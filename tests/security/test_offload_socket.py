"""Attack: another local process takes the hand-over socket.

The front hands every websocket over (request headers, cookies and the signed ticket
included) to whatever listens at ``DJANGO_WS_OFFLOAD_TO``. On the old default,
127.0.0.1:8001, any local user could bind the port first, or connect to the
websocket instance directly. Now the default is a unix socket in a directory only
the server's user may enter, and both sides refuse a socket directory that another
user owns, may enter, or could replace.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import threading

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

import django_ws
from tests.conftest import WS, private_dir, start_stack, stop
from tests.security.ini_runs import ini_copy, readme_env, start

pytestmark = pytest.mark.timeout(180)

NOBODY = 65534
OLD_DEFAULT_PORT = 8001
SECRET = "k" * 64


def connect_as(uid: int, path: str) -> int:
    """Try to connect to the unix socket ``path`` as ``uid``: 0, or the errno it got.

    The attempt runs in a forked child that drops to ``uid`` (root is available to
    the tests) and does nothing but the connect before it ends.
    """
    pid = os.fork()
    if pid == 0:  # the child: no cleanup, no return into pytest
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(path)
        except OSError as exc:
            code = exc.errno or 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def listen_queue(path: str) -> int:
    """The backlog of the listening unix socket ``path`` (``ss`` shows it as Send-Q)."""
    out = subprocess.run(["ss", "-xlnH"], capture_output=True, text=True, check=True, timeout=10).stdout
    for line in out.splitlines():
        fields = line.split()
        if path in fields:
            return int(fields[3])
    raise AssertionError(f"{path} is not a listening unix socket:\n{out}")


def _env(redis_server, project, **extra: str) -> dict[str, str]:
    return readme_env(redis_url=redis_server.url, secret=SECRET, EXAMPLE_DB=project.env["EXAMPLE_DB"], **extra)


def _remove(path: str) -> None:
    """Remove what a test created or planted at ``path`` (a directory or a link)."""
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _handshake_works(port: int, facility: str) -> None:
    ws = WS(f"ws://127.0.0.1:{port}/ws/{facility}?subscribe-broadcast")
    ws.ready()
    django_ws.publish(facility, "handed over", broadcast=True)
    assert ws.next()["data"] == "handed over"
    ws.close()


# --------------------------------------------------------------------------- the ini's default


def test_by_default_the_websocket_instance_listens_in_a_private_directory(redis_server, project, tmp_path, facility):
    run = start(ini_copy(tmp_path), _env(redis_server, project), tmp_path)
    address = ""
    try:
        run.wait_serving()
        address = run.websocket_listening()
        assert address.startswith("/"), f"the default hand-over is not a unix socket: {address}"
        assert stat.S_ISSOCK(os.lstat(address).st_mode)
        directory = os.lstat(os.path.dirname(address))
        assert stat.S_ISDIR(directory.st_mode) and not stat.S_ISLNK(directory.st_mode)
        assert (directory.st_uid, stat.S_IMODE(directory.st_mode)) == (os.geteuid(), 0o700)
        assert listen_queue(address) == 1024  # a full unix-socket queue would fail hand-overs at once

        assert connect_as(os.geteuid(), address) == 0  # the control: it is listening
        assert connect_as(NOBODY, address) == errno.EACCES  # another user cannot even reach it
        _handshake_works(run.port, facility)
    finally:
        run.stop()
        if address.startswith("/"):
            _remove(os.path.dirname(address))
    assert run.processes() == []


def test_a_planted_default_directory_stops_the_start(redis_server, project, tmp_path):
    """Another user who creates the ini's default directory first (or a symbolic link
    there) makes the start fail: nothing is handed to a socket in it."""
    ini = ini_copy(tmp_path)
    first = start(ini, _env(redis_server, project), tmp_path)
    try:
        first.wait_serving()
        address = first.websocket_environ()["DJANGO_WS_OFFLOAD_TO"]
    finally:
        first.stop()
    assert address.startswith("/"), f"the default hand-over is not a unix socket: {address}"
    directory = os.path.dirname(address)
    elsewhere = private_dir(tmp_path, "elsewhere")
    os.chown(elsewhere, NOBODY, NOBODY)
    try:
        for plant in ("open to others", "owned by another user", "symbolic link"):
            _remove(directory)
            if plant == "symbolic link":
                os.symlink(elsewhere, directory)
            else:
                os.mkdir(directory, 0o700)
                os.chmod(directory, 0o755 if plant == "open to others" else 0o700)
                if plant == "owned by another user":
                    os.chown(directory, NOBODY, NOBODY)
            run = start(ini, _env(redis_server, project), tmp_path)
            try:
                assert run.wait_exit(timeout=60) != 0, plant
                assert [line for line in run.refusals() if directory in line], (plant, run.text()[-2000:])
                assert run.processes() == []
            finally:
                run.stop()
    finally:
        _remove(directory)


def test_a_squatter_on_the_old_default_port_receives_no_hand_over(redis_server, project, tmp_path, facility):
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        squatter.bind(("127.0.0.1", OLD_DEFAULT_PORT))
    except OSError as exc:
        squatter.close()
        pytest.skip(f"127.0.0.1:{OLD_DEFAULT_PORT} is taken by another process on this machine ({exc.strerror})")
    squatter.listen(16)
    received: list[bytes] = []

    def accept() -> None:
        squatter.settimeout(0.2)
        while squatter.fileno() != -1:
            try:
                conn, _ = squatter.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    received.append(conn.recv(65536))
                except OSError:
                    received.append(b"(connected)")

    watcher = threading.Thread(target=accept, daemon=True)
    watcher.start()
    run = start(ini_copy(tmp_path), _env(redis_server, project), tmp_path)
    directory = ""
    try:
        run.wait_serving()
        directory = os.path.dirname(run.websocket_listening())
        for _ in range(3):
            _handshake_works(run.port, facility)
    finally:
        run.stop()
        squatter.close()
        watcher.join(5)
        if directory.startswith("/"):
            _remove(directory)
    assert received == []


# --------------------------------------------------------------------------- the websocket instance


# (a missing directory: uWSGI cannot bind the socket and exits before the application loads)
@pytest.mark.parametrize("plant", ["mode 0755", "owned by another user", "symbolic link"])
def test_the_websocket_instance_refuses_a_socket_directory_that_is_not_private(redis_server, tmp_path, plant):
    directory = tmp_path / "run"
    if plant == "mode 0755":
        directory.mkdir()
        directory.chmod(0o755)
    elif plant == "owned by another user":
        directory.mkdir(mode=0o700)
        os.chown(directory, NOBODY, NOBODY)
    elif plant == "symbolic link":
        directory.symlink_to(private_dir(tmp_path, "real"))
    env = readme_env(redis_url=redis_server.url, secret=SECRET, DJANGO_WS_OFFLOAD_TO=str(directory / "ws.sock"))
    run = start(ini_copy(tmp_path), env, tmp_path, section="websocket")
    try:
        assert run.wait_exit(timeout=30) != 0
        [line] = run.refusals()
        assert line.startswith("websocket instance not started: ") and str(directory) in line
        assert "Traceback" not in run.text()
        assert run.processes() == []
    finally:
        run.stop()


def test_the_rule_refuses_directories_above_that_others_may_change(tmp_path):
    from uwsgi_ws.config import check_socket_directory
    from uwsgi_ws.exceptions import ConfigurationError

    shared = tmp_path / "shared"
    shared.mkdir()
    run = private_dir(shared)
    check_socket_directory(str(run / "ws.sock"))  # the control: private all the way up
    shared.chmod(0o777)  # anyone may rename run away and put their own in its place
    with pytest.raises(ConfigurationError, match="another user"):
        check_socket_directory(str(run / "ws.sock"))
    shared.chmod(0o1777)  # sticky, like /tmp: nobody may rename another's entries
    check_socket_directory(str(run / "ws.sock"))
    shared.chmod(0o755)
    os.chown(shared, NOBODY, NOBODY)  # its owner may rename run away
    with pytest.raises(ConfigurationError, match="uid 65534"):
        check_socket_directory(str(run / "ws.sock"))


# --------------------------------------------------------------------------- Django


@pytest.mark.parametrize("plant", ["mode 0755", "owned by another user", "symbolic link", "missing"])
def test_django_refuses_to_hand_over_into_a_directory_that_is_not_private(project, tmp_path, plant):
    from django_ws.checks import check_settings
    from django_ws.middleware import WebSocketMiddleware

    directory = tmp_path / "run"
    if plant == "mode 0755":
        directory.mkdir()
        directory.chmod(0o755)
    elif plant == "owned by another user":
        directory.mkdir(mode=0o700)
        os.chown(directory, NOBODY, NOBODY)
    elif plant == "symbolic link":
        directory.symlink_to(private_dir(tmp_path, "real"))
    with override_settings(DJANGO_WS={"OFFLOAD_TO": ["127.0.0.1:9", f"{directory}/ws.sock"]}):
        errors = check_settings()
        assert [e.id for e in errors] == ["django_ws.E004"] and str(directory) in errors[0].msg
        with pytest.raises(ImproperlyConfigured, match=str(directory)):
            WebSocketMiddleware(lambda request: None)


def test_django_accepts_a_private_directory(project, tmp_path):
    from django_ws.checks import check_settings
    from django_ws.middleware import WebSocketMiddleware

    with override_settings(DJANGO_WS={"OFFLOAD_TO": f"{private_dir(tmp_path)}/ws.sock"}):
        assert check_settings() == []
        WebSocketMiddleware(lambda request: None)


# --------------------------------------------------------------------------- TCP, when asked for


def test_tcp_stays_possible_when_asked_for(project, tmp_path, facility):
    from tests.conftest import free_port

    port = free_port()
    stack = start_stack("offload", project, tmp_path, DJANGO_WS_OFFLOAD_TO=f"127.0.0.1:{port}")
    try:
        assert stack.ws_port == port and stack.ws_socket is None
        _handshake_works(stack.port, facility)
    finally:
        for proc in stack.procs:
            stop(proc)
