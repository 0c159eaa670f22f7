"""Publishing by POST, attacked: floods, made-up facilities, form bodies, lying lengths,
history that grows without bound. Against real servers and a real Redis.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import uuid

import pytest

import django_ws
from tests.conftest import WS, start_stack, stop, wait_for
from tests.test_sse import EventStream

TOKEN = "d" * 32


def new_session(project) -> tuple[int, str]:
    """A user of its own (so its own rate bucket), logged in: (pk, session key)."""
    from django.contrib.auth.models import User
    from django.test import Client

    user = User.objects.create_user("post-" + uuid.uuid4().hex[:10])
    client = Client()
    client.force_login(user)
    return user.pk, client.cookies["sessionid"].value


def post(
    port: int,
    path: str,
    body: bytes,
    *,
    session: str,
    content_type: str | None = "text/plain",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    sent = {"Cookie": f"sessionid={session}; csrftoken={TOKEN}", "X-CSRFToken": TOKEN}
    sent["Origin"] = f"http://127.0.0.1:{port}"
    if content_type is not None:
        sent["Content-Type"] = content_type
    sent.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("POST", path, body=body, headers=sent)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def raw(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send raw bytes; return the answer up to the end of its headers and body (Content-Length)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        answer = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
            head, sep, body = answer.partition(b"\r\n\r\n")
            if sep:
                lengths = [int(v) for k, v in _headers(head) if k == b"content-length"]
                if lengths and len(body) >= lengths[0]:
                    break
    return answer


def _headers(head: bytes) -> list[tuple[bytes, bytes]]:
    pairs = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        pairs.append((name.strip().lower(), value.strip()))
    return pairs


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer[:200]
    return int(answer.split(b" ", 2)[1])


def head(port: int, path: str, session: str, extra: str, content_type: str = "text/plain") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\n"
        f"Cookie: sessionid={session}; csrftoken={TOKEN}\r\nX-CSRFToken: {TOKEN}\r\n"
        f"Content-Type: {content_type}\r\nConnection: close\r\n{extra}\r\n"
    ).encode()


def nothing_else_arrives(receiver, facility: str, kind: str = "ws") -> list:
    """Publish a marker from the server; return whatever the receiver got before it."""
    marker = "marker-" + uuid.uuid4().hex
    django_ws.publish(facility, marker, broadcast=True)
    if kind == "ws":
        return receiver.until(marker)
    before = []
    while True:
        event, data = receiver.next()
        if event == "message":
            if data["data"] == marker:
                return before
            before.append(data["data"])


# --------------------------------------------------------------------------- the rate limit


@pytest.fixture(scope="module")
def limited(project, tmp_path_factory):
    """Two front instances (an offload front and a single instance) on one Redis, with a
    low rate limit (0.5 per second, bursts of 5): what one allows, the other knows."""
    extra = {"DJANGO_WS_RATE_LIMIT": "0.5,5"}
    first = start_stack("offload", project, tmp_path_factory.mktemp("limited-offload"), **extra)
    try:
        second = start_stack("single", project, tmp_path_factory.mktemp("limited-single"), **extra)
    except BaseException:
        for proc in first.procs:
            stop(proc)
        raise
    yield first, second
    for stack in (first, second):
        for proc in stack.procs:
            stop(proc)


def _most_allowed(elapsed: float, rate: float = 0.5, burst: int = 5) -> int:
    return burst + math.ceil(rate * elapsed) + 1


@pytest.mark.timeout(120)
def test_a_burst_of_posts_gets_429_after_the_burst(limited, project, facility, redis_server):
    front = limited[0]
    pk, session = new_session(project)
    receiver = WS(front.url(f"/ws/{facility}?subscribe-broadcast"))
    receiver.ready()
    started = time.monotonic()
    answers = [
        post(front.port, f"/ws/{facility}?publish-broadcast", b"flood %d" % i, session=session) for i in range(200)
    ]
    elapsed = time.monotonic() - started
    accepted = [i for i, (status, _, _) in enumerate(answers) if status == 200]
    refused = [(status, headers) for status, headers, _ in answers if status != 200]
    assert accepted[:5] == [0, 1, 2, 3, 4], answers[:6]  # the burst goes through
    assert len(accepted) <= _most_allowed(elapsed), (len(accepted), elapsed)
    assert {status for status, _ in refused} == {429}
    assert all(h.get("Retry-After", "").isdigit() and int(h["Retry-After"]) >= 1 for _, h in refused)
    # What was refused was not published: the receiver got exactly the accepted ones.
    assert nothing_else_arrives(receiver, facility) == [f"flood {i}" for i in accepted]
    receiver.close()
    from uwsgi_ws.protocol import rate_key

    bucket = rate_key("ws", f"user:{pk}")
    assert redis_server.client().pttl(bucket) > 0  # in Redis, and it will expire


@pytest.mark.timeout(120)
def test_the_limit_holds_across_two_front_instances(limited, project, facility):
    pk, session = new_session(project)
    started = time.monotonic()
    answers = []
    for i in range(40):
        front = limited[i % 2]
        answers.append((i % 2, post(front.port, f"/ws/{facility}?publish-broadcast", b"x", session=session)[0]))
    elapsed = time.monotonic() - started
    accepted = [front for front, status in answers if status == 200]
    assert {status for _, status in answers} == {200, 429}
    assert len(accepted) <= _most_allowed(elapsed), (len(accepted), elapsed)
    assert {front for front, status in answers if status == 429} == {0, 1}  # both fronts refuse


# --------------------------------------------------------------------------- what may be published


def test_an_unlisted_facility_is_refused_and_leaves_nothing_in_redis(stack, project, redis_server):
    """The example lists its facilities (FACILITIES): made-up names, each of which would
    keep a history in Redis for HISTORY_TTL, get 404."""
    _, session = new_session(project)
    fresh = "z" + uuid.uuid4().hex[:12]  # not among the example's (nor the tests') facilities
    status, _, _ = post(stack.port, f"/ws/{fresh}?publish-broadcast", b"x" * 60000, session=session)
    assert status == 404
    assert redis_server.client().keys(f"*{fresh}*") == []
    with pytest.raises(Exception) as refused:
        WS(stack.url(f"/ws/{fresh}?subscribe-broadcast"))
    assert getattr(refused.value, "status_code", None) == 404


@pytest.mark.parametrize(
    "content_type,body",
    [
        ("application/x-www-form-urlencoded", f"csrfmiddlewaretoken={TOKEN}&text=hello".encode()),
        (
            "multipart/form-data; boundary=XyZ",
            (
                f'--XyZ\r\nContent-Disposition: form-data; name="csrfmiddlewaretoken"\r\n\r\n{TOKEN}\r\n'
                '--XyZ\r\nContent-Disposition: form-data; name="text"\r\n\r\nhello\r\n--XyZ--\r\n'
            ).encode(),
        ),
        (None, b"no type at all"),
        ("text/html", b"<b>hello</b>"),
        ("text/plain; charset=latin-1", "caf\u00e9".encode("latin-1")),
    ],
)
def test_form_bodies_and_other_types_are_refused_and_never_published(stack, project, facility, content_type, body):
    """A form's fields, its CSRF token among them, must never be broadcast: 415."""
    if content_type is None and stack.mode == "runserver":
        pytest.skip("Django's development server (wsgiref) types a POST that has no Content-Type text/plain")
    _, session = new_session(project)
    receiver = WS(stack.url(f"/ws/{facility}?subscribe-broadcast"))
    receiver.ready()
    # The form carries its token in the body, as forms do (no X-CSRFToken header).
    status, _, answer = post(
        stack.port,
        f"/ws/{facility}?publish-broadcast",
        body,
        session=session,
        content_type=content_type,
        headers={"X-CSRFToken": ""},
    )
    assert status == 415, answer
    assert nothing_else_arrives(receiver, facility) == []
    receiver.close()


def test_json_is_validated_and_delivered_as_json(stack, project, facility):
    _, session = new_session(project)
    receiver = WS(stack.url(f"/ws/{facility}?subscribe-broadcast"))
    receiver.ready()
    path = f"/ws/{facility}?publish-broadcast"
    document = {"text": "h\u00e9llo", "n": [1, 2.5, None, True]}
    sent = json.dumps(document, indent=2).replace("\n", "\r\n").encode()  # CRs too, legal JSON spacing
    assert post(stack.port, path, sent, session=session, content_type="application/json")[0] == 200
    assert receiver.next()["data"] == document
    for bad in (b"{not json", b"[NaN]", b'{"a": Infinity}', b"[" * 20000 + b"]" * 20000, b'"\\ud800"', b"\xff"):
        status, _, answer = post(stack.port, path, bad, session=session, content_type="application/json")
        assert status == 400 and b"Traceback" not in answer, (bad[:20], status)
    # The browser client's own type, with its charset, is text.
    status, _, _ = post(stack.port, path, b"plain", session=session, content_type="text/plain; charset=utf-8")
    assert status == 200 and receiver.next()["data"] == "plain"
    assert nothing_else_arrives(receiver, facility) == []
    receiver.close()


def test_json_reaches_event_streams_intact(stack, project, facility):
    """JSON is published compact: its CRs (legal spacing) would end an SSE line."""
    _, session = new_session(project)
    es = EventStream(stack, f"/ws/{facility}?subscribe-broadcast")
    es.until("ready")
    document = {"a": [1, {"b": "c"}]}
    body = b'{\r"a"\r:\r[1,\r{"b":"c"}]}'
    status, _, _ = post(
        stack.port, f"/ws/{facility}?publish-broadcast", body, session=session, content_type="application/json"
    )
    assert status == 200
    assert es.next()[1]["data"] == document
    es.close()


# --------------------------------------------------------------------------- lengths


def _settled(stack) -> None:
    """Wait until the server has finished writing its start-up lines."""
    state = {"size": -1, "since": time.monotonic()}

    def quiet() -> bool:
        size = stack.log.stat().st_size
        if size != state["size"]:
            state["size"], state["since"] = size, time.monotonic()
        return size > 0 and time.monotonic() - state["since"] > 0.5

    wait_for(quiet, timeout=30, what="a quiet log")


def _mark(stack) -> str:
    """Make a request whose access line is recognisable; return its tag once logged."""
    tag = uuid.uuid4().hex
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=15)
    conn.request("GET", f"/login/?mark={tag}")
    assert conn.getresponse().status == 200
    conn.close()
    wait_for(lambda: tag in stack.log.read_text(), what="the marker's access line")
    return tag


def _logged_between(stack, first: str, last: str) -> list[str]:
    lines = stack.log.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    end = next(i for i, line in enumerate(lines) if last in line)
    return lines[start + 1 : end]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["offload", "single", "runserver"])
def test_a_malformed_length_is_a_400_and_one_log_line(project, tmp_path, mode):
    stack = start_stack(mode, project, tmp_path)
    try:
        _, session = new_session(project)
        path = "/ws/t0123456789ab?publish-broadcast"
        _settled(stack)
        cases = [("abc", 400), ("-1", 400), ("+5", 400), ("1e3", 400), ("0x10", 400), ("9" * 5000, 413)]
        for value, wanted in cases:
            first = _mark(stack)
            answer = raw(stack.port, head(stack.port, path, session, f"Content-Length: {value}\r\n") + b"hello")
            last = _mark(stack)
            assert status_of(answer) == wanted, (value, answer[:300])
            assert b"Traceback" not in answer
            # The request's own access line, and nothing else: no traceback, no error.
            # (The websocket instance may still be writing its start-up lines on a
            # loaded machine: those are no request's.)
            added = _logged_between(stack, first, last)
            access = [line for line in added if "/ws/" in line]
            assert len(access) == 1 and "POST /ws/" in access[0], (value, added)
            assert not [line for line in added if "Traceback" in line or "rror" in line], (value, added)
    finally:
        for proc in stack.procs:
            stop(proc)


def _chunked(body: bytes, size: int = 16384) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_a_chunked_body_is_bounded_too(stack, project, facility):
    """No Content-Length: the body is read as far as MAX_MESSAGE_SIZE, never trusted
    to be small (uWSGI decodes chunks; Django's development server cannot: 411)."""
    _, session = new_session(project)
    receiver = WS(stack.url(f"/ws/{facility}?subscribe-broadcast"))
    receiver.ready()
    path = f"/ws/{facility}?publish-broadcast"
    big = raw(stack.port, head(stack.port, path, session, "Transfer-Encoding: chunked\r\n") + _chunked(b"x" * 70000))
    small = raw(stack.port, head(stack.port, path, session, "Transfer-Encoding: chunked\r\n") + _chunked(b"chunked hi"))
    if stack.mode == "runserver":
        assert (status_of(big), status_of(small)) == (411, 411)
        assert nothing_else_arrives(receiver, facility) == []
    else:
        assert (status_of(big), status_of(small)) == (413, 200)
        assert nothing_else_arrives(receiver, facility) == ["chunked hi"]
    receiver.close()


def test_a_length_and_a_chunked_body_together_are_refused(stack, project, facility):
    _, session = new_session(project)
    both = "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"
    answer = raw(stack.port, head(stack.port, f"/ws/{facility}?publish-broadcast", session, both) + _chunked(b"hello"))
    assert status_of(answer) == 400  # which of the two frames the body is ambiguous: refused
    assert b"Traceback" not in answer


# --------------------------------------------------------------------------- history bytes


@pytest.fixture(scope="module")
def capped(project, tmp_path_factory):
    """A server keeping at most 256 KiB of history per channel, with no rate limit."""
    extra = {"DJANGO_WS_HISTORY_MAX_BYTES": str(256 * 1024), "DJANGO_WS_RATE_LIMIT": "0,0"}
    stack = start_stack("offload", project, tmp_path_factory.mktemp("capped"), **extra)
    yield stack
    for proc in stack.procs:
        stop(proc)


def _history(redis_server, facility: str) -> tuple[list[bytes], int, int]:
    """(kept envelopes, XLEN, MEMORY USAGE) of a facility's broadcast history."""
    from uwsgi_ws.protocol import Audience, Kind, channel_name, log_key

    key = log_key(channel_name("ws", facility, Audience(Kind.BROADCAST)))
    client = redis_server.client()
    entries = [fields[b"e"] for _, fields in client.xrange(key)]
    return entries, client.xlen(key), client.memory_usage(key, samples=0) or 0


@pytest.mark.timeout(120)
def test_the_history_byte_cap_holds_for_posts_and_websocket_frames(capped, project, facility, redis_server):
    cap = 256 * 1024
    _, session = new_session(project)
    path = f"/ws/{facility}?publish-broadcast"
    for i in range(40):
        status, _, _ = post(
            capped.port, path, b"%02d" % i + b"p" * 59998, session=session, content_type="application/octet-stream"
        )
        assert status == 200
    entries, length, memory = _history(redis_server, facility)
    assert 0 < length <= cap // 60000 and len(entries) == length
    assert sum(len(e) for e in entries) <= cap
    assert memory <= cap + 64 * 1024, memory  # what Redis really holds, with its overhead
    from uwsgi_ws.protocol import decode_envelope

    assert [decode_envelope(e).offset for e in entries] == list(range(41 - length, 41))  # the newest

    # A websocket client's frames go through the websocket instance: the cap travels
    # there in the ticket.
    sender = WS(capped.url(f"/ws/{facility}?publish-broadcast"), session=session)
    sender.ready()
    for _ in range(20):
        sender.send(b"w" * 60000)
    wait_for(lambda: int(redis_server.client().hget(_meta(facility), "offset")) == 60, what="60 messages")
    entries, length, memory = _history(redis_server, facility)
    assert 0 < length <= cap // 60000 and sum(len(e) for e in entries) <= cap and memory <= cap + 64 * 1024
    sender.close()


def _meta(facility: str) -> str:
    from uwsgi_ws.protocol import Audience, Kind, channel_name, meta_key

    return meta_key(channel_name("ws", facility, Audience(Kind.BROADCAST)))


@pytest.mark.timeout(120)
def test_recovery_says_so_when_the_cap_trimmed_what_was_needed(capped, project, facility):
    _, session = new_session(project)
    path = f"/ws/{facility}?publish-broadcast"
    offsets = []
    for i in range(10):
        status, _, answer = post(
            capped.port, path, b"%d" % i + b"r" * 59999, session=session, content_type="application/octet-stream"
        )
        assert status == 200
        offsets.append(json.loads(answer)["published"][0])
    first, recent = offsets[0], offsets[-3]
    from urllib.parse import quote

    for since, recovered, replayed in ((first, False, 0), (recent, True, 2)):
        positions = quote(json.dumps({"broadcast": [since["offset"], since["epoch"]]}))
        client = WS(capped.url(f"/ws/{facility}?subscribe-broadcast&recover={positions}"))
        frames = client.ready()
        assert [f["recovered"] for f in frames if f["type"] == "subscribed"] == [recovered]
        assert len([f for f in frames if f["type"] == "message"]) == replayed
        client.close()


# --------------------------------------------------------------------------- the system check


def test_client_publishing_without_facilities_is_a_check_error(project):
    from django.conf import settings
    from django.test import override_settings

    from django_ws.checks import check_settings

    open_ended = {key: value for key, value in settings.DJANGO_WS.items() if key != "FACILITIES"}
    with override_settings(DJANGO_WS={**open_ended, "CLIENT_PUBLISH": ("broadcast",)}):
        errors = [e for e in check_settings() if e.id == "django_ws.E005"]
        assert len(errors) == 1 and "FACILITIES" in errors[0].msg
    with override_settings(DJANGO_WS={**open_ended, "CLIENT_PUBLISH": ()}):
        assert not [e for e in check_settings() if e.id == "django_ws.E005"]
    with override_settings(DJANGO_WS={**open_ended, "CLIENT_PUBLISH": ("group",), "FACILITIES": ["room-*"]}):
        assert not [e for e in check_settings() if e.id == "django_ws.E005"]
    assert check_settings() == []  # the example: client publishing, and its list of facilities


# --------------------------------------------------------------------------- the same rules, with RequestFactory


def _rf_post(project, body: bytes, *, content_type: str = "text/plain", **meta):
    import io

    from django.contrib.auth.models import User
    from django.test import RequestFactory

    from django_ws.middleware import WebSocketMiddleware

    user, _ = User.objects.get_or_create(username="post-rf-" + uuid.uuid4().hex[:8])
    factory = RequestFactory()
    factory.cookies["csrftoken"] = TOKEN
    request = factory.post(
        "/ws/f?publish-broadcast",
        data=body,
        content_type=content_type,
        HTTP_HOST="127.0.0.1:8000",
        HTTP_ORIGIN="http://127.0.0.1:8000",
        HTTP_X_CSRFTOKEN=TOKEN,
    )
    for key, value in meta.items():
        if value is None:
            request.META.pop(key, None)
        else:
            request.META[key] = value
    if meta.get("wsgi.input_terminated"):
        request.META["wsgi.input"] = io.BytesIO(body)  # what the server decoded
    request.user = user
    request.session = type("S", (), {"session_key": None})()
    return WebSocketMiddleware(lambda r: None)(request)


@pytest.mark.parametrize("size,status", [(10, 200), (65536, 200), (65537, 413), (10**6, 413)])
def test_a_server_that_decodes_chunks_gives_no_more_than_the_limit(project, size, status):
    """Servers that decode chunked bodies themselves (wsgi.input_terminated, as gunicorn
    sets it) hand the body over without a length: it is read no further than the limit."""
    response = _rf_post(
        project,
        b"c" * size,
        CONTENT_LENGTH=None,
        HTTP_TRANSFER_ENCODING="chunked",
        **{"wsgi.input_terminated": True},
    )
    assert response.status_code == status


def test_chunked_without_a_decoding_server_is_411(project):
    response = _rf_post(project, b"hello", CONTENT_LENGTH=None, HTTP_TRANSFER_ENCODING="chunked")
    assert response.status_code == 411


def test_json_that_grows_past_the_limit_when_written_compact_is_413(project):
    body = b"[" + b",".join([b"1e15"] * 13000) + b"]"  # 65 KB as sent, 234 KB written out
    assert len(body) <= 65536
    assert _rf_post(project, body, content_type="application/json").status_code == 413


@pytest.mark.timeout(120)
def test_websockets_and_posts_of_a_client_share_one_bucket(limited, project, facility):
    # The client spends its burst (5) with POSTs; its websockets, on another front
    # instance, then find the bucket empty: every frame is refused (and, if it keeps
    # sending, the connection is closed with 1008) until tokens come back.
    pk, session = new_session(project)
    started = time.monotonic()
    statuses = [post(limited[0].port, f"/ws/{facility}?publish-broadcast", b"p", session=session)[0] for _ in range(5)]
    assert statuses == [200] * 5
    ws = WS(limited[1].url(f"/ws/{facility}?publish-broadcast&subscribe-broadcast&echo"), session=session)
    ws.ready()
    for i in range(3):
        ws.send(f"frame {i}")
    frames = [ws.next() for _ in range(3)]
    elapsed = time.monotonic() - started
    refused = [f for f in frames if f["type"] == "error" and f["code"] == "rate_limited"]
    published = [f for f in frames if f["type"] == "message"]
    # At most the tokens regained since the burst (0.5 per second) went through.
    assert len(published) <= math.ceil(0.5 * elapsed), (frames, elapsed)
    assert len(refused) >= 3 - math.ceil(0.5 * elapsed) and refused, frames
    ws.close()
