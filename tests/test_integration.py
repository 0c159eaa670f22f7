"""End to end: Django publishes, real websockets receive, through real uWSGI and Redis.

Every scenario runs against both servers: the offload stack (front Django instance
plus websocket instance) and the single instance (Django and websockets in one
gevent uWSGI). "Nobody else received it" is checked without sleeping: after the
targeted message a marker is broadcast, and each client reads up to the marker.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse

import pytest
import websocket

import django_ws
from tests.conftest import WS


def marker(n: int = 0) -> str:
    return f"--marker-{n}--"


def recover_query(positions: dict[str, list]) -> str:
    return "recover=" + urllib.parse.quote(json.dumps(positions))


# --------------------------------------------------------------------------- audiences


def test_broadcast_reaches_every_subscriber_of_the_facility_only(stack, connect, facility):
    a = connect("subscribe-broadcast")
    b = connect("subscribe-broadcast")
    other = connect("subscribe-broadcast", path=f"/ws/{facility}x?subscribe-broadcast")
    for ws in (a, b, other):
        ws.ready()
    django_ws.publish(facility, {"n": 1}, broadcast=True)
    django_ws.publish(facility, marker(), broadcast=True)
    django_ws.publish(facility + "x", marker(), broadcast=True)
    assert a.until(marker()) == [{"n": 1}]
    assert b.until(marker()) == [{"n": 1}]
    assert other.until(marker()) == []


def test_users_groups_and_sessions_reach_exactly_their_audience(stack, project, connect, facility):
    query = "subscribe-broadcast&subscribe-user&subscribe-group&subscribe-session"
    clients = {name: connect(query, session=project.cookie(name)) for name in ("alice", "bob", "carol")}
    anon_key = project.anonymous_session()
    anon = connect("subscribe-broadcast&subscribe-session", session=anon_key)
    bob_second = connect(query, session=project.cookie("bob"))  # another session of bob
    for ws in [*clients.values(), anon, bob_second]:
        ws.ready()

    django_ws.publish(facility, "to alice", users=[project.users["alice"]])
    django_ws.publish(facility, "to bob by name", users=["bob"])
    django_ws.publish(facility, "to red", groups=["red"])
    django_ws.publish(facility, "to blue team", groups=["blue team"])
    django_ws.publish(facility, "to anon session", sessions=[anon_key])
    django_ws.publish(facility, marker(), broadcast=True)

    assert clients["alice"].until(marker()) == ["to alice", "to red"]
    assert clients["bob"].until(marker()) == ["to bob by name", "to blue team"]
    assert clients["carol"].until(marker()) == ["to blue team"]
    assert anon.until(marker()) == ["to anon session"]
    assert bob_second.until(marker()) == ["to bob by name", "to blue team"]


def test_one_session_channel_is_not_shared_with_another_session_of_the_user(stack, project, connect, facility):
    key1, key2 = project.cookie("alice"), project.cookie("alice")
    first = connect("subscribe-session&subscribe-broadcast", session=key1)
    second = connect("subscribe-session&subscribe-broadcast", session=key2)
    first.ready(), second.ready()
    django_ws.publish(facility, "first only", sessions=[key1])
    django_ws.publish(facility, marker(), broadcast=True)
    assert first.until(marker()) == ["first only"]
    assert second.until(marker()) == []


def test_subscribed_frames_name_the_channels(stack, project, connect):
    ws = connect("subscribe-user&subscribe-group&subscribe-broadcast", session=project.cookie("bob"))
    labels = {f["channel"] for f in ws.ready() if f["type"] == "subscribed"}
    assert labels == {"broadcast", "user", "group:blue team"}


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "query",
    ["subscribe-user", "subscribe-group", "publish-broadcast", "publish-user"],
)
def test_anonymous_users_are_refused_user_channels_and_publishing(stack, connect, query):
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        connect(query)
    assert info.value.status_code == 403


def test_session_channel_without_a_session_is_refused(stack, connect):
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        connect("subscribe-session")
    assert info.value.status_code == 403


def test_publish_to_an_audience_not_granted_is_refused(stack, project, connect):
    # The example grants broadcast, user and group publishing, not session.
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        connect("publish-session", session=project.cookie("alice"))
    assert info.value.status_code == 403


def test_cross_origin_handshake_is_refused(stack, connect):
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        connect("subscribe-broadcast", origin="http://evil.example")
    assert info.value.status_code == 403
    connect("subscribe-broadcast", origin=f"http://127.0.0.1:{stack.port}").ready()


@pytest.mark.parametrize(
    "path,status",
    [
        ("/ws/chat?subscribe-broadcast&bogus", 400),
        ("/ws/chat?subscribe-broadcast&subscribe-broadcast", 400),
        ("/ws/chat", 400),
        ("/ws/a..b?subscribe-broadcast", 400),
        ("/ws/%C3%A9?subscribe-broadcast", 400),
    ],
)
def test_bad_parameters_get_400(stack, connect, path, status):
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        connect("", path=path)
    assert info.value.status_code == status


def _http(stack, method: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_plain_get_gets_426_with_an_explanation(stack):
    status, body = _http(stack, "GET", "/ws/chat?subscribe-broadcast")
    assert status == 426
    assert b"websocket" in body and b"Traceback" not in body


def test_wrong_method_gets_405(stack):
    # POST publishes (see test_sse.py); other methods have no meaning here.
    status, _ = _http(stack, "PUT", "/ws/chat?subscribe-broadcast")
    assert status == 405


def test_bad_handshake_gets_400(stack):
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "not-base64!",
    }
    status, body = _http(stack, "GET", "/ws/chat?subscribe-broadcast", headers)
    assert status == 400
    assert b"Sec-WebSocket-Key" in body


# --------------------------------------------------------------------------- client publishing


def test_client_publish_reaches_the_granted_audience(stack, project, connect, facility):
    alice = connect("subscribe-broadcast&publish-broadcast", session=project.cookie("alice"))
    bob = connect("subscribe-broadcast&subscribe-group", session=project.cookie("bob"))
    carol_group = connect("subscribe-group", session=project.cookie("carol"))
    for ws in (alice, bob, carol_group):
        ws.ready()
    alice.send("hello everyone")
    assert bob.until("hello everyone") == []
    # publish-group goes to the sender's own groups only
    bob_pub = connect("publish-group", session=project.cookie("bob"))
    bob_pub.ready()
    bob_pub.send("blue only")
    assert carol_group.until("blue only") == []
    django_ws.publish(facility, marker(), broadcast=True)
    assert alice.until(marker()) == []  # no echo by default, and not in group blue


def test_echo_on_and_off(stack, project, connect, facility):
    session = project.cookie("alice")
    quiet = connect("subscribe-broadcast&publish-broadcast", session=session)
    echo = connect("subscribe-broadcast&publish-broadcast&echo", session=session)
    quiet.ready(), echo.ready()
    # The same text from both connections: echo is decided by sender, not by content.
    quiet.send("same text")
    assert echo.next()["data"] == "same text"  # quiet's message
    echo.send("same text")
    assert echo.next()["data"] == "same text"  # its own, echoed
    django_ws.publish(facility, marker(), broadcast=True)
    assert quiet.until(marker()) == ["same text"]  # echo's message only, not its own
    assert echo.until(marker()) == []


def test_binary_round_trip(stack, project, connect, facility):
    blob = bytes(range(256)) * 4
    sender = connect("publish-broadcast", session=project.cookie("alice"))
    receiver = connect("subscribe-broadcast")
    sender.ready(), receiver.ready()
    sender.send(blob)
    frame = receiver.next()
    assert frame["binary"] and frame["data"] == blob and frame["channel"] == "broadcast"
    django_ws.publish(facility, b"\x00\xffserver", broadcast=True)
    frame = receiver.next()
    assert frame["binary"] and frame["data"] == b"\x00\xffserver"


def test_connection_without_publish_right_gets_an_error_frame(stack, connect):
    ws = connect("subscribe-broadcast")
    ws.ready()
    ws.send("not allowed")
    assert ws.next() == {"type": "error", "code": "forbidden", "error": "this connection may not publish"}


def test_a_django_view_publishes(stack, project, connect, facility):
    # The example's /say/ view publishes to facility "chat".
    ws = connect("", path="/ws/chat?subscribe-broadcast")
    ws.ready()
    status, body = _post(stack, "/say/", "text=from+a+view", project.cookie("carol"))
    assert status == 200, body
    assert ws.until({"from": "carol", "text": "from a view"}) is not None


def _post(stack, path: str, body: str, session: str) -> tuple[int, bytes]:
    token = "a" * 32
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    conn.request(
        "POST",
        path,
        body=body,
        headers={
            "Cookie": f"sessionid={session}; csrftoken={token}",
            "X-CSRFToken": token,
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


# --------------------------------------------------------------------------- history and recovery


def test_reconnect_recovers_missed_messages_once_in_order(stack, connect, facility):
    ws = connect("subscribe-broadcast")
    subscribed = ws.ready()
    django_ws.publish(facility, "m1", broadcast=True)
    first = ws.next()
    assert first["data"] == "m1"
    ws.close()
    for i in range(2, 6):
        django_ws.publish(facility, f"m{i}", broadcast=True)
    again = connect(recover_query({"broadcast": [first["offset"], first["epoch"]]}) + "&subscribe-broadcast")
    frames = again.ready()
    assert [f["data"] for f in frames if f["type"] == "message"] == ["m2", "m3", "m4", "m5"]
    [status] = [f for f in frames if f["type"] == "subscribed"]
    assert status["recovered"] is True and status["offset"] == first["offset"] + 4
    django_ws.publish(facility, "live", broadcast=True)
    assert again.next()["data"] == "live"  # nothing repeated before it
    assert subscribed[0]["recovered"] is None


def test_recovery_from_the_position_of_an_empty_channel(stack, connect, facility):
    ws = connect("subscribe-broadcast")
    [status] = ws.ready()
    assert (status["offset"], status["epoch"]) == (0, "")
    ws.close()
    django_ws.publish(facility, "while away", broadcast=True)
    again = connect("subscribe-broadcast&" + recover_query({"broadcast": [0, ""]}))
    frames = again.ready()
    assert [f.get("data") for f in frames] == ["while away", None]
    assert frames[-1]["recovered"] is True


def test_not_recovered_after_history_expiry(stack, connect, facility, redis_server, ws_settings):
    ws = connect("subscribe-broadcast")
    ws.ready()
    ws_settings(HISTORY_TTL=0.3)
    [published] = django_ws.publish(facility, "short-lived", broadcast=True)
    seen = ws.next()
    ws.close()
    client = redis_server.client()
    from uwsgi_ws.protocol import log_key, meta_key

    wait_for_gone = lambda: not client.exists(meta_key(published.channel), log_key(published.channel))  # noqa: E731
    from tests.conftest import wait_for

    wait_for(wait_for_gone, timeout=10, what="history expiry")
    django_ws.publish(facility, "after expiry", broadcast=True)
    again = connect("subscribe-broadcast&" + recover_query({"broadcast": [seen["offset"], seen["epoch"]]}))
    frames = again.ready()
    assert frames[-1]["type"] == "subscribed" and frames[-1]["recovered"] is False
    # The new epoch's message is replayed: the client cannot have seen it.
    assert [f["data"] for f in frames if f["type"] == "message"] == ["after expiry"]
    assert frames[-1]["epoch"] != seen["epoch"]


def test_not_recovered_when_history_was_trimmed(stack, connect, facility, ws_settings):
    ws_settings(HISTORY_SIZE=3)
    ws = connect("subscribe-broadcast")
    ws.ready()
    django_ws.publish(facility, "seen", broadcast=True)
    seen = ws.next()
    ws.close()
    for i in range(5):
        django_ws.publish(facility, f"missed {i}", broadcast=True)
    again = connect("subscribe-broadcast&" + recover_query({"broadcast": [seen["offset"], seen["epoch"]]}))
    assert again.ready()[-1]["recovered"] is False


def test_latest_option_sends_the_last_message_on_connect(stack, connect, facility):
    for i in range(3):
        django_ws.publish(facility, f"v{i}", broadcast=True)
    ws = connect("subscribe-broadcast&latest")
    frames = ws.ready()
    assert [f["data"] for f in frames if f["type"] == "message"] == ["v2"]


# --------------------------------------------------------------------------- the front stays free


def test_front_with_one_thread_answers_pages_while_websockets_are_open(offload_stack, facility):
    sockets = [WS(offload_stack.url(f"/ws/{facility}?subscribe-broadcast")) for _ in range(50)]
    try:
        for ws in sockets:
            ws.ready()
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", offload_stack.port, timeout=10)
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 200 and b"Public room" in response.read()
        print(f"page answered in {time.monotonic() - started:.3f}s with 50 websockets open")
        django_ws.publish(facility, "still connected", broadcast=True)
        assert all(ws.next()["data"] == "still connected" for ws in sockets)
    finally:
        for ws in sockets:
            ws.close()


def test_oversized_client_message_closes_with_1009(stack, project, connect, facility, ws_settings):
    ws = connect("subscribe-broadcast&publish-broadcast", session=project.cookie("alice"))
    ws.ready()
    ws.send("x" * 70000)  # MAX_MESSAGE_SIZE defaults to 65536
    while True:
        opcode, data = ws.conn.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
    assert int.from_bytes(data[:2], "big") == 1009
    other = connect("subscribe-broadcast")
    other.ready()
    django_ws.publish(facility, "others unaffected", broadcast=True)
    assert other.next()["data"] == "others unaffected"


def test_publish_raises_when_redis_is_unreachable(project, ws_settings):
    from tests.conftest import free_port

    ws_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(django_ws.PublishError, match="could not publish"):
        django_ws.publish("chat", "lost?", broadcast=True)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({}, ValueError),
        ({"users": "alice"}, TypeError),
        ({"broadcast": True, "facility": "a/b"}, ValueError),
    ],
)
def test_publish_rejects_bad_arguments(project, kwargs, error):
    facility = kwargs.pop("facility", "chat")
    with pytest.raises(error):
        django_ws.publish(facility, "x", **kwargs)


def test_websocket_side_never_imports_django():
    import subprocess
    import sys

    code = (
        "import sys, uwsgi_ws.app, uwsgi_ws.session, uwsgi_ws.hub, uwsgi_ws.store; "
        "assert not any(m == 'django' or m.startswith('django.') for m in sys.modules), 'django imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_slow_consumer_is_closed_with_4008_and_others_lose_nothing(stack, connect, facility):
    import socket

    stalled = connect("subscribe-broadcast", sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    reader = connect("subscribe-broadcast")
    stalled.ready(), reader.ready()
    chunk = "y" * 60000
    # 36 MB: more than every socket buffer on the way (the front's offload relay
    # included) plus the server's SEND_QUEUE_BYTES (1 MiB)
    total = 600
    for i in range(total):
        django_ws.publish(facility, f"{i}:{chunk}", broadcast=True)
        got = reader.next()
        assert got["data"].startswith(f"{i}:"), (i, got)
    # The stalled client now reads what reached it: the server dropped the rest and
    # closed it (with close code 4008 when the close frame fit in the pipe in time).
    received, code = 0, None
    while True:
        try:
            opcode, data = stalled.conn.recv_data(control_frame=True)
        except websocket.WebSocketConnectionClosedException:
            break
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big")
            break
        received += 1
    assert code in (4008, None)
    assert received < total


# --------------------------------------------------------------------------- framing


def test_ping_is_answered_with_pong(stack, connect):
    ws = connect("subscribe-broadcast")
    ws.ready()
    ws.conn.ping(b"are you there")
    while True:
        opcode, data = ws.conn.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_PONG:
            break
    assert data == b"are you there"


def test_close_handshake_is_answered(stack, connect):
    ws = connect("subscribe-broadcast")
    ws.ready()
    ws.conn.send_close(1000, b"bye")
    while True:
        opcode, data = ws.conn.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
    assert int.from_bytes(data[:2], "big") == 1000


@pytest.mark.parametrize("opcode", [websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY])
def test_fragmented_messages_are_published_whole(stack, project, connect, opcode):
    sender = connect("publish-broadcast", session=project.cookie("alice"))
    receiver = connect("subscribe-broadcast")
    sender.ready(), receiver.ready()
    parts = [b"frag-", b"men-", b"ted"]
    sender.conn.send_frame(websocket.ABNF(0, 0, 0, 0, opcode, 1, parts[0]))
    sender.conn.send_frame(websocket.ABNF(0, 0, 0, 0, websocket.ABNF.OPCODE_CONT, 1, parts[1]))
    sender.conn.send_frame(websocket.ABNF(1, 0, 0, 0, websocket.ABNF.OPCODE_CONT, 1, parts[2]))
    frame = receiver.next()
    expected = b"frag-men-ted" if opcode == websocket.ABNF.OPCODE_BINARY else "frag-men-ted"
    assert frame["data"] == expected


def test_invalid_utf8_text_is_refused_with_1007(stack, project, connect, facility):
    sender = connect("publish-broadcast&subscribe-broadcast", session=project.cookie("alice"))
    sender.ready()
    sender.conn.send_frame(websocket.ABNF(1, 0, 0, 0, websocket.ABNF.OPCODE_TEXT, 1, b"\xff\xfe"))
    while True:
        opcode, data = sender.conn.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
    assert int.from_bytes(data[:2], "big") == 1007


def test_publish_flood_is_rate_limited_per_connection(stack, project, connect, facility):
    # RATE_LIMIT defaults to 10 messages per second with bursts of 20: the burst is
    # published, the next messages are refused with error frames, and a client that
    # keeps flooding after REFUSALS refusals is closed with 1008. With echo on, the
    # published ones come back (those published before the close, in order).
    import websocket

    from uwsgi_ws.core import REFUSALS

    flooder = connect("publish-broadcast&subscribe-broadcast&echo", session=project.cookie("alice"))
    flooder.ready()
    for i in range(60):
        flooder.send(f"flood {i}")
    flooded, errors = [], 0
    while True:
        opcode, data = flooder.conn.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big")
            break
        frame = json.loads(data)
        if frame["type"] == "error":
            assert frame["code"] == "rate_limited"
            errors += 1
        elif frame["type"] == "message":
            flooded.append(frame["data"])
    assert code == 1008
    assert errors == REFUSALS
    assert flooded == [f"flood {i}" for i in range(len(flooded))]  # echoes of the burst, in order
    assert len(flooded) <= 20
