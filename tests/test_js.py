"""The browser client (django_ws/static/django_ws/django_ws.js).

Its unit tests live in tests/js and run with Node's own test runner; the tests here
run them, then check the client against the server's protocol module: the URLs it
builds parse with ``parse_query``, and the frames ``client_frame`` builds decode.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from uwsgi_ws.protocol import (
    KIND_BINARY,
    KIND_JSON,
    KIND_TEXT,
    Envelope,
    Position,
    client_frame,
    parse_query,
    sse_message_data,
)

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "django_ws" / "static" / "django_ws" / "django_ws.mjs"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node is not on PATH: the browser client's tests (tests/js) need Node.js 20 or later"
)


def node(script: str, *args: str) -> str:
    """Run an ES module ``script`` with the client importable as ``C``; return its stdout."""
    program = f"import * as C from {json.dumps(CLIENT.as_uri())};\n{script}"
    result = subprocess.run(
        [NODE, "--input-type=module", "-e", program, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_node_unit_tests() -> None:
    result = subprocess.run(
        [NODE, "--test", "tests/js/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"node --test tests/js/ failed:\n{result.stdout[-20000:]}\n{result.stderr[-5000:]}"


def test_urls_parse_with_the_server_query_parser() -> None:
    positions = {
        "broadcast": [12, "1700000000.123-0"],
        "user": [0, ""],
        "group:a&b=c d+e/%ü{}:": [3, "e"],
    }
    many = {f"group:g{i}": [i, "1700000000.123"] for i in range(400)}
    urls = json.loads(
        node(
            """
const positions = JSON.parse(process.argv[1]);
const many = JSON.parse(process.argv[2]);
const base = C.buildUrl({url: "ws://h/ws/chat", subscribe: ["broadcast", "user", "group"],
                         publish: ["broadcast"], echo: true, latest: true});
console.log(JSON.stringify([C.withRecover(base, positions), C.withRecover(base, many)]));
""",
            json.dumps(positions),
            json.dumps(many),
        )
    )
    request = parse_query(urls[0].split("?", 1)[1])
    assert {k.value for k in request.subscribe} == {"broadcast", "user", "group"}
    assert {k.value for k in request.publish} == {"broadcast"}
    assert request.echo and request.latest
    assert dict(request.recover) == {label: Position(*p) for label, p in positions.items()}

    # Too many channels for the server's limits: the client sends what fits, and the
    # server accepts it (instead of refusing the connection with a 400).
    request = parse_query(urls[1].split("?", 1)[1])
    assert 0 < len(request.recover) <= 256
    for label, position in request.recover.items():
        assert position == Position(*many[label])


def _payload(frame: bytes) -> tuple[int, bytes]:
    """Return the opcode and payload of one unmasked server frame."""
    opcode, length = frame[0] & 0x0F, frame[1] & 0x7F
    start = 2
    if length == 126:
        length, start = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, start = int.from_bytes(frame[2:10], "big"), 10
    return opcode, frame[start : start + length]


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_server_frames_decode_in_the_client(transport: str) -> None:
    """Websocket frames (decodeFrame) and event-stream data (decodeEventData) decode
    to the same messages."""
    envelopes = [
        ("broadcast", Envelope(b"s", KIND_TEXT, 1, "e1", 'plain "text" ü'.encode())),
        ("user", Envelope(b"s", KIND_JSON, 2, "e2", json.dumps({"a": [1, None, "ü"]}).encode())),
        ("group:staff", Envelope(b"s", KIND_BINARY, 3, "e3", bytes(range(256)) * 300)),
    ]
    frames = []
    for label, envelope in envelopes:
        if transport == "sse":
            frames.append({"event": sse_message_data(label, envelope)})
            continue
        opcode, payload = _payload(client_frame(label, envelope))
        frames.append(
            {"text": payload.decode()} if opcode == 1 else {"binary": base64.b64encode(payload).decode("ascii")}
        )
    decoded = json.loads(
        node(
            """
const out = JSON.parse(process.argv[1]).map((f) => {
  const frame = f.event !== undefined ? C.decodeEventData(f.event)
    : C.decodeFrame(f.text !== undefined ? f.text : Buffer.from(f.binary, "base64"));
  if (frame.binary) frame.data = Buffer.from(frame.data).toString("base64");
  return frame;
});
console.log(JSON.stringify(out));
""",
            json.dumps(frames),
        )
    )
    assert decoded[0] == {
        "type": "message",
        "channel": "broadcast",
        "offset": 1,
        "epoch": "e1",
        "data": 'plain "text" ü',
    }
    assert decoded[1] == {
        "type": "message",
        "channel": "user",
        "offset": 2,
        "epoch": "e2",
        "data": {"a": [1, None, "ü"]},
    }
    binary = decoded[2]
    assert base64.b64decode(binary.pop("data")) == bytes(range(256)) * 300
    assert binary == {"type": "message", "channel": "group:staff", "offset": 3, "epoch": "e3", "binary": True}
