"""The deployment guide's nginx configuration (docs/howto/deploy.md), for real: websockets
and event streams through nginx."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator

import pytest

import django_ws
from tests.conftest import ROOT, WS, free_port, port_open, stop, wait_for

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

pytestmark = pytest.mark.timeout(120)


DEPLOY_GUIDE = ROOT / "docs" / "howto" / "deploy.md"


def readme_snippet() -> str:
    """The nginx configuration of the deployment guide (between its nginx-snippet marks)."""
    text = DEPLOY_GUIDE.read_text()
    match = re.search(r"<!-- nginx-snippet -->\s*```nginx\n(.*?)```", text, re.S)
    assert match, "the nginx snippet is missing from docs/howto/deploy.md"
    return match.group(1)


def readme_server(upstream_port: int, port: int) -> str:
    """The deployment guide's server block, in plain HTTP on ``port``, in front of ``upstream_port``."""
    server = readme_snippet()
    server = server.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
    server = server.replace("listen 443 ssl;", f"listen 127.0.0.1:{port};")
    return server.replace("server_name example.com;", "server_name 127.0.0.1;")


@contextlib.contextmanager
def running_nginx(server: str, port: int, tmp_path) -> Iterator[int]:
    """Run nginx (one worker, files under ``tmp_path``) with ``server`` until the block ends."""
    if not os.path.exists(NGINX):
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"  access_log {tmp_path}/access.log;\n"
        f"  client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;\n"
        f"  fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;\n"
        f"{server}\n}}\n"
    )
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.PIPE)
    try:
        # An nginx that exits (a bad configuration) ends the wait at once.
        wait_for(lambda: proc.poll() is not None or port_open(port), what="nginx", timeout=15)
    except TimeoutError:
        proc.kill()
        proc.wait(5)
        raise RuntimeError(f"nginx did not listen on {port}: {proc.stderr.read().decode()}") from None
    if proc.poll() is not None:
        raise RuntimeError(f"nginx exited with {proc.returncode}: {proc.stderr.read().decode()}")
    try:
        yield port
    finally:
        stop(proc, signal.SIGQUIT)


@pytest.fixture
def nginx(offload_stack, tmp_path):
    """nginx with the deployment guide's server block, in plain HTTP on a free port, in front of the stack."""
    port = free_port()
    with running_nginx(readme_server(offload_stack.port, port), port, tmp_path):
        yield port


def test_websocket_through_nginx(nginx, facility):
    ws = WS(f"ws://127.0.0.1:{nginx}/ws/{facility}?subscribe-broadcast", origin=f"http://127.0.0.1:{nginx}")
    ws.ready()
    django_ws.publish(facility, "hello via nginx", broadcast=True)
    assert ws.next()["data"] == "hello via nginx"
    ws.close()


def test_event_stream_through_nginx_is_not_buffered(nginx, facility):
    from tests.test_sse import EventStream

    class Through:  # EventStream only needs the port
        port = nginx

    es = EventStream(Through, f"/ws/{facility}?subscribe-broadcast")
    assert es.response.status == 200
    es.until("ready")
    django_ws.publish(facility, "streamed via nginx", broadcast=True)
    assert es.next()[1]["data"] == "streamed via nginx"
    es.close()
