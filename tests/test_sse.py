"""Server-Sent Events on the same facility URLs, on every server."""

from __future__ import annotations

import http.client
import json
import urllib.parse

import pytest

import django_ws


class EventStream:
    """A minimal, real SSE client over http.client (what a browser's EventSource does)."""

    def __init__(
        self,
        stack,
        path: str,
        *,
        session: str | None = None,
        last_event_id: str | None = None,
        origin: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=timeout)
        headers = {"Accept": "text/event-stream"}
        if session:
            headers["Cookie"] = f"sessionid={session}"
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        if origin:
            headers["Origin"] = origin
        self.conn.request("GET", path, headers=headers)
        self.response = self.conn.getresponse()
        self.last_id: str | None = None
        self.comments = 0
        self.heartbeats = 0

    def next(self) -> tuple[str, dict]:
        """Return the next (event, data) pair; comments and heartbeats are counted, not returned."""
        event, data = "message", []
        while True:
            line = self.response.fp.readline()
            if not line:
                raise ConnectionError("stream ended")
            line = line.decode("utf-8").rstrip("\n")
            if line == "":
                if event == "heartbeat" and data:
                    assert json.loads("\n".join(data)) == {"type": "heartbeat"}
                    self.heartbeats += 1
                elif data:
                    return event, json.loads("\n".join(data))
                event, data = "message", []
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "id":
                self.last_id = value
            elif field == "event":
                event = value
            elif field == "data":
                data.append(value)

    def until(self, kind: str) -> list[tuple[str, dict]]:
        seen = []
        while True:
            event, data = self.next()
            if event == kind:
                return seen
            seen.append((event, data))

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def stream(stack, facility):
    opened = []

    def open_(query: str, **kwargs) -> EventStream:
        es = EventStream(stack, f"/ws/{facility}?{query}", **kwargs)
        opened.append(es)
        return es

    yield open_
    for es in opened:
        es.close()


def test_event_stream_delivers_each_audience(stack, project, stream, facility):
    es = stream("subscribe-broadcast&subscribe-user&subscribe-group", session=project.cookie("alice"))
    assert es.response.status == 200
    assert es.response.getheader("Content-Type").startswith("text/event-stream")
    subscribed = es.until("ready")
    assert {d["channel"] for e, d in subscribed if e == "subscribed"} == {"broadcast", "user", "group:red"}
    django_ws.publish(facility, "all", broadcast=True)
    django_ws.publish(facility, {"to": "alice"}, users=["alice"])
    django_ws.publish(facility, "not alice", users=["bob"])
    django_ws.publish(facility, "red", groups=["red"])
    django_ws.publish(facility, b"\x00bin", broadcast=True)
    got = [es.next() for _ in range(4)]
    assert [(e, d["channel"], d["data"]) for e, d in got] == [
        ("message", "broadcast", "all"),
        ("message", "user", {"to": "alice"}),
        ("message", "group:red", "red"),
        ("message", "broadcast", "AGJpbg=="),
    ]
    assert got[-1][1]["binary"] is True


def test_last_event_id_recovers_exactly_the_missed_messages(stack, stream, facility):
    es = stream("subscribe-broadcast")
    es.until("ready")
    django_ws.publish(facility, "seen", broadcast=True)
    assert es.next()[1]["data"] == "seen"
    last_id = es.last_id
    es.close()
    for i in range(3):
        django_ws.publish(facility, f"missed {i}", broadcast=True)
    again = stream("subscribe-broadcast", last_event_id=last_id)
    frames = again.until("ready")
    assert [d["data"] for e, d in frames if e == "message"] == ["missed 0", "missed 1", "missed 2"]
    assert [d["recovered"] for e, d in frames if e == "subscribed"] == [True]


def test_recover_query_parameter_on_a_first_request(stack, stream, facility):
    [published] = django_ws.publish(facility, "before the page", broadcast=True)
    django_ws.publish(facility, "after", broadcast=True)
    positions = urllib.parse.quote(json.dumps({"broadcast": [published.offset, published.epoch]}))
    frames = stream(f"subscribe-broadcast&recover={positions}").until("ready")
    assert [d["data"] for e, d in frames if e == "message"] == ["after"]


def test_not_recovered_event_after_the_history_is_lost(stack, stream, facility, redis_server):
    es = stream("subscribe-broadcast")
    es.until("ready")
    [published] = django_ws.publish(facility, "soon lost", broadcast=True)
    es.next()
    last_id = es.last_id
    es.close()
    from uwsgi_ws.protocol import log_key, meta_key

    redis_server.client().delete(meta_key(published.channel), log_key(published.channel))
    # The channel starts again in a new epoch: the client's position is of the lost one.
    django_ws.publish(facility, "after the loss", broadcast=True)
    frames = stream("subscribe-broadcast", last_event_id=last_id).until("ready")
    assert [d["recovered"] for e, d in frames if e == "subscribed"] == [False]
    assert [d["data"] for e, d in frames if e == "message"] == ["after the loss"]


@pytest.mark.parametrize("query", ["subscribe-user", "subscribe-session"])
def test_refusals_apply_to_event_streams(stack, stream, query):
    assert stream(query).response.status == 403


def test_cross_origin_event_stream_is_refused(stack, stream):
    assert stream("subscribe-broadcast", origin="http://evil.example").response.status == 403


def _post(
    stack,
    path: str,
    body: bytes,
    *,
    session: str,
    content_type: str = "text/plain",
    csrf: bool = True,
    sender: str | None = None,
):
    token = "b" * 32
    headers = {"Content-Type": content_type, "Cookie": f"sessionid={session}; csrftoken={token}"}
    if sender is not None:
        headers["X-DjangoWs-Sender"] = sender
    if csrf:
        headers["X-CSRFToken"] = token
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def _ready(es: EventStream) -> dict:
    while True:
        event, data = es.next()
        if event == "ready":
            return data


def test_a_stream_does_not_get_its_own_posts_back_unless_echo(stack, project, stream, facility):
    me, other = stream("subscribe-broadcast"), stream("subscribe-broadcast")
    echoing = stream("subscribe-broadcast&echo")
    mine, echo_id = _ready(me)["sender"], _ready(echoing)["sender"]
    _ready(other)
    alice = project.cookie("alice")
    path = f"/ws/{facility}?publish-broadcast"
    assert _post(stack, path, b"from me", session=alice, sender=mine)[0] == 200
    assert _post(stack, path, b"from echo", session=alice, sender=echo_id)[0] == 200
    assert _post(stack, path, b"anonymous", session=alice)[0] == 200
    assert [other.next()[1]["data"] for _ in range(3)] == ["from me", "from echo", "anonymous"]
    assert [echoing.next()[1]["data"] for _ in range(3)] == ["from me", "from echo", "anonymous"]
    assert me.next()[1]["data"] == "from echo"  # "from me" was not sent back
    assert _post(stack, path, b"x", session=alice, sender="not-hex!")[0] == 400


def test_post_publishes_with_the_same_rights(stack, project, stream, facility):
    es = stream("subscribe-broadcast")
    es.until("ready")
    alice = project.cookie("alice")
    status, body = _post(stack, f"/ws/{facility}?publish-broadcast", b"posted", session=alice)
    assert status == 200, body
    assert json.loads(body)["published"][0]["channel"] == "broadcast"
    assert es.next()[1]["data"] == "posted"
    status, _ = _post(
        stack, f"/ws/{facility}?publish-broadcast", b"\x00\x01", session=alice, content_type="application/octet-stream"
    )
    assert status == 200 and es.next()[1]["binary"] is True


def test_post_publish_refusals(stack, project, facility):
    anonymous = project.anonymous_session()
    alice = project.cookie("alice")
    assert _post(stack, f"/ws/{facility}?publish-broadcast", b"x", session=alice, csrf=False)[0] == 403
    assert _post(stack, f"/ws/{facility}?publish-broadcast", b"x", session=anonymous)[0] == 403
    assert _post(stack, f"/ws/{facility}?publish-session", b"x", session=alice)[0] == 403  # not granted
    assert _post(stack, f"/ws/{facility}?subscribe-broadcast", b"x", session=alice)[0] == 400
    assert _post(stack, f"/ws/{facility}?publish-broadcast", b"x" * 70000, session=alice)[0] == 413


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["offload", "runserver"])
def test_keepalive_heartbeats_keep_an_idle_stream_alive(project, tmp_path, mode):
    from tests.conftest import start_stack, stop

    stack = start_stack(mode, project, tmp_path, DJANGO_WS_HEARTBEAT="0.3")
    try:
        es = EventStream(stack, "/ws/keepalive?subscribe-broadcast")
        es.until("ready")
        # From now on a 1-second read timeout stands for a proxy's idle timeout:
        # without the heartbeat events, the idle stream below would be cut. (Not
        # before: opening the stream on a loaded machine may take longer.)
        es.response.fp.raw._sock.settimeout(1.0)
        while es.heartbeats < 8:  # well over a second without a message
            line = es.response.fp.readline()
            assert line, "stream ended"
            if line == b"event: heartbeat\n":
                es.heartbeats += 1
        assert es.response.fp.readline() == b'data: {"type":"heartbeat"}\n'
        assert es.response.fp.readline() == b"\n"
        django_ws.publish("keepalive", "still here", broadcast=True)
        assert es.next()[1]["data"] == "still here"
        es.close()
    finally:
        for proc in stack.procs:
            stop(proc)
