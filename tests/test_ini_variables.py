"""Every environment variable uwsgi.ini.example documents works: the stack starts with
each of them set to a value other than its default, and each value takes effect.

uWSGI reads every ``UWSGI_*`` variable as an option of its own, so a variable named
like that by mistake (``UWSGI_BIN`` once) stops the start under ``strict``; this test
starts the stack with every documented variable at once and checks what each did,
from the servers' own start-up lines and from a websocket that gets a message.
"""

from __future__ import annotations

import re
import shutil

import pytest

from tests.conftest import EXAMPLE, UWSGI, WS, free_port, port_open, private_dir, wait_for
from tests.security.ini_runs import INI, readme_env, start

pytestmark = pytest.mark.timeout(120)


def documented_variables() -> set[str]:
    """The names in the ini's "Overridable from the environment" block."""
    text = INI.read_text()
    block = text.split("; Overridable from the environment:\n", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"\b((?:DJANGO|UWSGI)_[A-Z0-9_]+)\b", block))


def test_every_documented_variable_takes_effect(redis_server, project, tmp_path, facility):
    # A copy of the example, with a settings module that only this copy has.
    site = tmp_path / "site"
    shutil.copytree(EXAMPLE, site, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    (site / "chat" / "settings_other.py").write_text(
        f"from .settings import *  # noqa: F403\nDJANGO_WS = {{**DJANGO_WS, 'FACILITIES': ['{facility}-other']}}\n"
    )
    socket_path = private_dir(tmp_path, "sockets") / "ws.sock"
    used = tmp_path / "uwsgi-bin-used"
    wrapper = tmp_path / "uwsgi-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$@" > {used}\nexec {UWSGI} "$@"\n')
    wrapper.chmod(0o755)

    env = readme_env(redis_url=redis_server.url, secret=project.env["DJANGO_WS_SECRET"])
    port = int(env["DJANGO_WS_HTTP"].rsplit(":", 1)[1])
    ops_port = free_port()
    values = {
        "DJANGO_WS_SECRET": env["DJANGO_WS_SECRET"],
        "DJANGO_WS_HTTP": env["DJANGO_WS_HTTP"],
        "DJANGO_WS_OFFLOAD_TO": str(socket_path),
        "DJANGO_WS_REDIS_URL": redis_server.url,
        "DJANGO_SETTINGS_MODULE": "chat.settings_other",
        "DJANGO_WS_PROJECT_DIR": str(site),
        "DJANGO_WS_PROCESSES": "3",
        "DJANGO_WS_THREADS": "2",
        "DJANGO_WS_OFFLOAD_THREADS": "3",
        "DJANGO_WS_ASYNC": "55",
        "DJANGO_WS_WORKERS": "2",
        "UWSGI_LISTEN": "99",
        "DJANGO_WS_UWSGI_BIN": str(wrapper),
        "DJANGO_WS_OPS_HTTP": f"127.0.0.1:{ops_port}",
    }
    assert set(values) == documented_variables(), "a variable the ini documents has no case here"
    env.update(values, EXAMPLE_DB=project.env["EXAMPLE_DB"])

    run = start(INI, env, tmp_path)
    try:
        run.wait_serving()
        wait_for(
            lambda: "spawned uWSGI worker 2 (pid: " in run.text() and "cores: 55)" in run.text(),
            what="the websocket instance's workers",
        )
        ws = WS(f"ws://127.0.0.1:{port}/ws/{facility}-other?subscribe-broadcast")
        try:
            ws.ready()
            import django_ws

            django_ws.publish(f"{facility}-other", "through every variable", broadcast=True)
            frame = ws.next()
            assert (frame["type"], frame["data"]) == ("message", "through every variable")
        finally:
            ws.close()
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/health/live", timeout=10) as live:
            assert live.status == 200  # DJANGO_WS_OPS_HTTP
        log = run.text()
    finally:
        run.stop()

    assert f"bound to TCP address 127.0.0.1:{port} fd" in log  # DJANGO_WS_HTTP
    assert f"bound to UNIX address {socket_path} fd" in log  # DJANGO_WS_OFFLOAD_TO
    assert f"chdir() to {site}" in log  # DJANGO_WS_PROJECT_DIR (and the settings module only it has)
    front_workers = re.findall(r"spawned uWSGI worker (\d+) \(pid: \d+, cores: 2\)", log)
    assert sorted(front_workers) == ["1", "2", "3"]  # DJANGO_WS_PROCESSES x DJANGO_WS_THREADS
    assert len(re.findall(r"spawned 3 offload threads for uWSGI worker \d", log)) == 3
    websocket_workers = re.findall(r"spawned uWSGI worker (\d+) \(pid: \d+, cores: 55\)", log)
    assert sorted(websocket_workers) == ["1", "2"]  # DJANGO_WS_WORKERS
    assert "async cores set to 55" in log  # DJANGO_WS_ASYNC
    assert log.count("listen backlog is limited to 99 connections") == 2  # UWSGI_LISTEN, both instances
    assert "--ini" in used.read_text() and ":websocket" in used.read_text()  # DJANGO_WS_UWSGI_BIN
    assert not port_open(port)


def test_the_documented_list_is_read_from_the_ini():
    names = documented_variables()
    assert {"DJANGO_WS_SECRET", "DJANGO_WS_PROCESSES", "DJANGO_WS_THREADS", "UWSGI_LISTEN"} <= names
    assert "UWSGI_BIN" not in names
