"""The browser client (django_ws/static/django_ws/django_ws.mjs and its builds).

Its unit tests live in client/test (the npm package's tests) and run with Node's own
test runner; the tests here check that the committed classic and minified builds are
those of the module, run the unit tests, pack the npm package and run its tests from
the tarball, then check the client against the server's protocol module: the URLs it
builds parse with ``parse_query``, and the frames ``client_frame`` builds decode.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tarfile
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
STATIC = ROOT / "django_ws" / "static" / "django_ws"
CLIENT = STATIC / "django_ws.mjs"
PACKAGE = ROOT / "client"
NODE = shutil.which("node")
NPM = shutil.which("npm")

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node is not on PATH: the browser client's tests (client/test) need Node.js 20 or later"
)
needs_build_tools = pytest.mark.skipif(
    NPM is None or not (PACKAGE / "node_modules" / "terser").is_dir(),
    reason="the client's build tools are not installed: scripts/bootstrap.sh runs npm ci in client/",
)


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-20000:]}\n{result.stderr[-5000:]}"
    return result


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


@needs_build_tools
def test_committed_builds_are_those_of_the_module() -> None:
    """django_ws.js and django_ws.min.js are built from django_ws.mjs, byte for byte."""
    result = run([NODE, "client/build.mjs", "--check"], ROOT)
    sizes = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert set(sizes) == {"django_ws.mjs", "django_ws.js", "django_ws.min.js"}


@needs_build_tools
def test_the_type_declarations_compile_and_refuse_wrong_use() -> None:
    """tsc --strict on client/typecheck/usage.ts: right uses compile, each @ts-expect-error is one."""
    run(
        [
            str(PACKAGE / "node_modules" / ".bin" / "tsc"),
            "--noEmit",
            "--strict",
            "--lib",
            "es2020,dom",
            "--target",
            "es2020",
            "--module",
            "es2020",
            "--moduleResolution",
            "bundler",
            "typecheck/usage.ts",
        ],
        PACKAGE,
    )


@needs_build_tools
def test_node_unit_tests() -> None:
    run([NODE, "client/build.mjs", "--check"], ROOT)  # fills client/dist, which the tests import
    run([NODE, "--test", "client/test/"], ROOT)


@needs_build_tools
def test_npm_pack_makes_an_installable_package_whose_tests_pass(tmp_path: Path) -> None:
    assert NPM is not None
    result = run([NPM, "pack", "--pack-destination", str(tmp_path)], PACKAGE)
    [tarball] = tmp_path.glob("django-uwsgi-ws-*.tgz")
    assert tarball.name in result.stdout
    with tarfile.open(tarball) as tar:
        names = sorted(tar.getnames())
        tar.extractall(tmp_path / "unpacked", filter="data")
    expected = {
        f"package/dist/{name}" for name in ("django_ws.mjs", "django_ws.js", "django_ws.min.js", "django_ws.d.ts")
    }
    assert expected <= set(names)
    assert "package/package.json" in names
    assert not [n for n in names if "node_modules" in n or n.endswith("build.mjs")]
    for name in ("django_ws.mjs", "django_ws.js", "django_ws.min.js", "django_ws.d.ts"):
        assert (tmp_path / "unpacked/package/dist" / name).read_bytes() == (STATIC / name).read_bytes(), name

    # Its own tests, from the tarball's files alone.
    run([NODE, "--test", "test/"], tmp_path / "unpacked" / "package")

    # Installed in a project (offline: the package has no dependencies), both ways in.
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "app", "version": "1.0.0", "private": true}')
    run([NPM, "install", "--offline", "--no-audit", "--no-fund", str(tarball)], app)
    out = run(
        [
            NODE,
            "--input-type=module",
            "-e",
            "import { connect, CLOSE_CODES } from 'django-uwsgi-ws';"
            "import { createRequire } from 'node:module';"
            "const cjs = createRequire(process.cwd() + '/x.js')('django-uwsgi-ws');"
            "console.log(typeof connect, CLOSE_CODES.SERVICE_RESTART, typeof cjs.connect);",
        ],
        app,
    ).stdout
    assert out.split() == ["function", "1012", "function"]


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


def test_the_npm_package_has_the_python_package_version() -> None:
    import uwsgi_ws

    assert json.loads((PACKAGE / "package.json").read_text())["version"] == uwsgi_ws.__version__
