"""Sockets do not outlive the rights they were opened with.

A logout (or any end of the session) closes that session's connections; any Django
process can close the connections of users, groups or sessions on every websocket
instance and worker with ``django_ws.disconnect()``; ``MAX_CONNECTION_AGE`` makes
clients come back for fresh rights.
"""

from __future__ import annotations

import http.client
import time

import pytest
import websocket

import django_ws
from tests.conftest import WS, start_stack, stop
from tests.direct import handshake_vars, new_key, open_direct, read_until_close
from tests.security.helpers import Browser
from uwsgi_ws.protocol import Limits, Ticket, sign_ticket


def close_of(ws: WS, timeout: float = 10.0) -> tuple[int | None, str]:
    """Read until the server's close frame; return its code and reason."""
    ws.conn.settimeout(timeout)
    while True:
        try:
            opcode, data = ws.conn.recv_data(control_frame=True)
        except websocket.WebSocketConnectionClosedException:
            return None, ""
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return (int.from_bytes(data[:2], "big") if len(data) >= 2 else None), data[2:].decode()


def test_logout_closes_the_sockets_of_that_session_only(offload_stack, project, facility):
    first, second = Browser(offload_stack.port), Browser(offload_stack.port)
    first.login("alice")
    second.login("alice")  # alice in another browser
    query = f"/ws/{facility}?subscribe-user&subscribe-broadcast"
    before = WS(offload_stack.url(query), session=first.cookies["sessionid"])
    other = WS(offload_stack.url(query), session=second.cookies["sessionid"])
    before.ready()
    other.ready()
    first.logout()
    assert close_of(before) == (4100, "session ended")
    django_ws.publish(facility, "private", users=["alice"])
    assert other.next()["data"] == "private"  # the other browser stays logged in
    other.close()


def test_logging_in_closes_the_sockets_of_the_anonymous_session(offload_stack, project, facility):
    # login() gives the session a new key (cycle_key): what the old key subscribed
    # to is nobody's any more. No user_logged_out here: the middleware sees the key end.
    visitor = Browser(offload_stack.port)
    status, _ = visitor.request("GET", "/")
    assert status == 200
    anonymous = project.anonymous_session()
    visitor.cookies["sessionid"] = anonymous
    ws = WS(offload_stack.url(f"/ws/{facility}?subscribe-session"), session=anonymous)
    ws.ready()
    visitor.login("bob")
    assert visitor.cookies["sessionid"] != anonymous
    assert close_of(ws) == (4100, "session ended")


def test_logout_outside_the_middleware_closes_the_session(offload_stack, project, facility):
    from django.test import Client

    key = project.cookie("carol")
    ws = WS(offload_stack.url(f"/ws/{facility}?subscribe-broadcast"), session=key)
    ws.ready()
    client = Client()
    client.cookies["sessionid"] = key
    client.logout()  # user_logged_out, without a request through the middleware
    assert close_of(ws) == (4100, "session ended")


def test_disconnect_on_logout_can_be_turned_off(offload_stack, project, facility, ws_settings):
    from django.test import Client

    ws_settings(DISCONNECT_ON_LOGOUT=False)
    key = project.cookie("carol")
    ws = WS(offload_stack.url(f"/ws/{facility}?subscribe-broadcast"), session=key)
    ws.ready()
    client = Client()
    client.cookies["sessionid"] = key
    client.logout()
    django_ws.publish(facility, "still open", broadcast=True)
    assert ws.next()["data"] == "still open"
    ws.close()


@pytest.fixture(scope="module")
def two_workers(project, tmp_path_factory):
    stack = start_stack("offload", project, tmp_path_factory.mktemp("two-workers"), DJANGO_WS_WORKERS="2")
    yield stack
    for proc in stack.procs:
        stop(proc)


def open_on_both_workers(stack, redis_server, url: str, session: str) -> list[WS]:
    """Open sockets until both websocket workers hold some (at most 60)."""
    sockets = []
    for _ in range(60):
        ws = WS(url, session=session)
        ws.ready()
        sockets.append(ws)
        if len(redis_server.worker_connections()) >= 2 and len(sockets) >= 4:
            break
    return sockets


def test_disconnect_reaches_every_worker_and_spares_others(two_workers, project, redis_server, facility):
    url = two_workers.url(f"/ws/{facility}?subscribe-broadcast")
    bob = open_on_both_workers(two_workers, redis_server, url, project.cookie("bob"))
    workers = {pid for pid, c in redis_server.worker_connections().items() if c["hub"]}
    assert len(workers) >= 2, "the test needs sockets on two workers"
    alice = WS(url, session=project.cookie("alice"))
    alice.ready()
    assert django_ws.disconnect(users=["bob"]) >= 2  # every worker of this instance got it
    for ws in bob:
        assert close_of(ws) == (4100, "")
    django_ws.publish(facility, "after", broadcast=True)
    assert alice.next()["data"] == "after"
    alice.close()


def test_disconnect_by_group_and_with_a_code_of_the_projects_choice(two_workers, project, facility):
    url = two_workers.url(f"/ws/{facility}?subscribe-broadcast")
    carol = WS(url, session=project.cookie("carol"))  # in "blue team"
    alice = WS(url, session=project.cookie("alice"))  # in "red"
    carol.ready()
    alice.ready()
    django_ws.disconnect(groups=["blue team"], code=4200, reason="rights changed")
    assert close_of(carol) == (4200, "rights changed")
    django_ws.publish(facility, "after", broadcast=True)
    assert alice.next()["data"] == "after"
    alice.close()


def test_disconnect_closes_event_streams(offload_stack, project, facility):
    key = project.cookie("bob")
    conn = http.client.HTTPConnection("127.0.0.1", offload_stack.port, timeout=10)
    conn.request(
        "GET",
        f"/ws/{facility}?subscribe-broadcast",
        headers={
            "Accept": "text/event-stream",
            "Cookie": f"sessionid={key}",
            "Host": f"127.0.0.1:{offload_stack.port}",
        },
    )
    response = conn.getresponse()
    assert response.status == 200
    received = b""
    while b"event: ready" not in received:
        received += response.read1(65536)
    django_ws.disconnect(sessions=[key], reason="bye")
    while True:
        chunk = response.read1(65536)
        if not chunk:
            break
        received += chunk
    assert b'event: close\ndata: {"type": "close", "code": 4100, "reason": "bye"}' in received
    conn.close()


@pytest.mark.parametrize("code", [1000, 3999, 4008, 4009, 4010, 5000, "4100"])
def test_disconnect_refuses_codes_it_cannot_use(project, code):
    with pytest.raises(ValueError, match="close code"):
        django_ws.disconnect(users=["bob"], code=code)


def test_disconnect_needs_a_target(project):
    with pytest.raises(ValueError, match="needs a target"):
        django_ws.disconnect()


def test_old_connections_are_closed_for_fresh_rights(offload_stack, project, facility):
    key = new_key()
    ticket = Ticket(
        subscribe={"broadcast": "{ws:" + facility + ":broadcast}"},
        limits=Limits(heartbeat=30),
        expires=time.time() + 10,
        key=key,
        max_age=1.0,
    )
    token = sign_ticket(ticket, project.env["DJANGO_WS_SECRET"].encode())
    conn, rest = open_direct(offload_stack, handshake_vars(token, key=key))
    started = time.monotonic()
    code, reason = read_until_close(conn, rest)
    conn.close()
    assert (code, reason) == (4010, b"connection too old: reconnect")
    assert time.monotonic() - started < 10  # long before the heartbeat would have ended it
