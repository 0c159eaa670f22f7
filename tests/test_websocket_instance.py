"""The websocket instance trusts nothing but a valid ticket, and scales per worker.

Tickets are sent straight to the websocket instance's uwsgi-protocol socket, the
way the front's offload thread forwards a request.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import pytest

import django_ws
from tests.conftest import UWSGI
from tests.direct import handshake_vars as direct_vars
from tests.direct import new_key, status_line
from uwsgi_ws.protocol import Limits, Ticket, sign_ticket

KEY = new_key()


def handshake_vars(ticket: str | None) -> dict[str, str]:
    return direct_vars(ticket, key=KEY)


def ticket(secret: str, *, expires_in: float = 10.0, channel: str = "{ws:direct:broadcast}", key: str = KEY) -> str:
    """Sign a ticket the way Django does, for the handshake with ``key``."""
    t = Ticket(
        subscribe={"broadcast": channel},
        limits=Limits(),
        expires=time.time() + expires_in,
        key=key,
    )
    return sign_ticket(t, secret.encode())


def test_valid_ticket_is_served(offload_stack, project):
    # The control case: the same request with a good ticket completes the handshake.
    assert b" 101 " in status_line(offload_stack, handshake_vars(ticket(project.env["DJANGO_WS_SECRET"])))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda secret, channel: None, id="missing"),
        pytest.param(lambda secret, channel: ticket("not the secret", channel=channel), id="forged"),
        pytest.param(lambda secret, channel: ticket(secret, expires_in=-60, channel=channel), id="expired"),
        pytest.param(lambda secret, channel: ticket(secret, channel=channel)[:-3] + "abc", id="tampered"),
    ],
)
def test_bad_tickets_are_refused_with_403(offload_stack, project, redis_server, facility, make):
    channel = "{ws:" + facility + ":broadcast}"
    line = status_line(offload_stack, handshake_vars(make(project.env["DJANGO_WS_SECRET"], channel)))
    assert line.startswith(b"HTTP/1.1 403"), line
    assert redis_server.client().pubsub_numsub(channel)[0][1] == 0  # nothing subscribed


def test_uwsgi_is_built_with_ssl_and_pcre_routing():
    help_text = subprocess.run([str(UWSGI), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--https-socket " in help_text, "uWSGI lacks SSL: the websocket handshake cannot work"
    assert "--response-route-if " in help_text, "uWSGI lacks PCRE: the hand-over routes cannot work"
    assert "--gevent " in help_text, "uWSGI lacks the gevent loop engine"


# --------------------------------------------------------------------------- scale


async def _open_many(url: str, n: int, parallel: int = 100) -> list:
    import websockets

    gate = asyncio.Semaphore(parallel)

    async def one():
        async with gate:
            ws = await websockets.connect(url, open_timeout=60, max_size=None, ping_interval=None)
            while True:  # up to the "ready" frame
                frame = await asyncio.wait_for(ws.recv(), 60)
                if '"ready"' in frame:
                    return ws

    return await asyncio.gather(*(one() for _ in range(n)))


async def _receive(sockets: list, text: str) -> int:
    async def one(ws):
        while True:
            frame = await asyncio.wait_for(ws.recv(), 60)
            if text in frame:
                return 1

    return sum(await asyncio.gather(*(one(ws) for ws in sockets)))


@pytest.mark.timeout(300)
def test_1100_websockets_on_one_worker_all_receive_and_redis_connections_stay_constant(
    offload_stack, redis_server, facility
):
    url = offload_stack.url(f"/ws/{facility}?subscribe-broadcast")

    async def scenario():
        first = await _open_many(url, 20)
        with_20 = redis_server.worker_connections()
        rest = await _open_many(url, 1080)
        sockets = first + rest
        with_1100 = redis_server.worker_connections()
        started = time.monotonic()
        django_ws.publish(facility, "to all 1100", broadcast=True)
        received = await _receive(sockets, "to all 1100")
        elapsed = time.monotonic() - started
        await asyncio.gather(*(ws.close() for ws in sockets))
        return with_20, with_1100, received, elapsed

    with_20, with_1100, received, elapsed = asyncio.run(scenario())
    print(
        f"\n1100 websockets: {received} received the broadcast in {elapsed:.3f}s; Redis connections "
        f"of the websocket worker: {with_20} with 20 open, {with_1100} with 1100 open"
    )
    assert received == 1100
    assert with_20 and set(with_20) == set(with_1100)  # the same worker processes
    for counts in (with_20, with_1100):
        for per_worker in counts.values():
            # one subscriber connection per worker, whatever the number of websockets,
            # plus at most the configured pool (DJANGO_WS_POOL_SIZE=4 in the test stacks)
            assert per_worker["hub"] == 1
            assert per_worker["pool"] <= 4


def test_front_reaches_the_websocket_instance_over_a_unix_socket(project, tmp_path, facility):
    """DJANGO_WS_OFFLOAD_TO may be a unix socket path (cheaper than loopback TCP)."""
    from tests.conftest import WS, start_stack, stop
    from tests.test_sse import EventStream

    path = tmp_path / "ws.sock"
    stack = start_stack("offload", project, tmp_path, DJANGO_WS_OFFLOAD_TO=str(path))
    try:
        assert path.is_socket()
        ws = WS(stack.url(f"/ws/{facility}?subscribe-broadcast"))
        ws.ready()
        es = EventStream(stack, f"/ws/{facility}?subscribe-broadcast")
        es.until("ready")
        django_ws.publish(facility, "over a unix socket", broadcast=True)
        assert ws.next()["data"] == "over a unix socket"
        assert es.next()[1]["data"] == "over a unix socket"
        ws.close()
        es.close()
    finally:
        for proc in stack.procs:
            stop(proc)


def test_sharded_pubsub_end_to_end(project, tmp_path, facility, monkeypatch):
    """PUBLISH_COMMAND = SPUBLISH on both sides: sharded pub/sub (Redis 7), as a Cluster needs."""
    import django_ws.conf
    from django_ws.publishing import get_redis
    from tests.conftest import WS, start_stack, stop

    stack = start_stack("offload", project, tmp_path, DJANGO_WS_PUBLISH_COMMAND="SPUBLISH")
    monkeypatch.setenv("DJANGO_WS_PUBLISH_COMMAND", "SPUBLISH")
    monkeypatch.setattr(django_ws.conf, "_cached", None)  # re-read; the old settings come back after
    try:
        ws = WS(stack.url(f"/ws/{facility}?subscribe-broadcast"))
        ws.ready()
        sharded = [c.decode() for c in get_redis().execute_command("PUBSUB", "SHARDCHANNELS")]
        plain = [c.decode() for c in get_redis().execute_command("PUBSUB", "CHANNELS")]
        assert [c for c in sharded if facility in c] and not [c for c in plain if facility in c]
        django_ws.publish(facility, "over sharded pub/sub", broadcast=True)
        assert ws.next()["data"] == "over sharded pub/sub"
        ws.close()
    finally:
        for proc in stack.procs:
            stop(proc)


def test_one_front_spreads_hand_overs_over_two_websocket_instances(project, tmp_path, facility):
    """OFFLOAD_TO with two addresses: hand-overs take turns; a publish reaches both instances' clients."""
    from tests.conftest import WS, start_stack, stop, unix_socket_open, wait_for

    first, second = tmp_path / "ws1.sock", tmp_path / "ws2.sock"
    # The second websocket instance, as the ini's [websocket] section runs it.
    env = {**os.environ, **project.env, "DJANGO_WS_OFFLOAD_TO": str(second), "DJANGO_WS_ASYNC": "100"}
    log = (tmp_path / "second.log").open("wb")
    other = subprocess.Popen(
        [str(UWSGI), "--ini", "uwsgi.ini.example:websocket"],
        cwd=str(UWSGI.parent.parent.parent),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stack = None
    try:
        wait_for(lambda: unix_socket_open(str(second)), what="second websocket instance", timeout=30)
        stack = start_stack(
            "offload", project, tmp_path, DJANGO_WS_OFFLOAD_TO=str(first), EXAMPLE_OFFLOAD_TO=f"{first},{second}"
        )
        clients = [WS(stack.url(f"/ws/{facility}?subscribe-broadcast")) for _ in range(6)]
        for ws in clients:
            ws.ready()
        django_ws.publish(facility, "to both instances", broadcast=True)
        assert [ws.next()["data"] for ws in clients] == ["to both instances"] * 6
        for ws in clients:
            ws.close()

        # uWSGI logs a request when it ends: every other hand-over went to the second instance.
        def served_by_second() -> int:
            return (tmp_path / "second.log").read_text().count(f"GET /ws/{facility}")

        wait_for(lambda: served_by_second() >= 3, what="the second instance's request log", timeout=15)
        assert served_by_second() == 3
    finally:
        if stack is not None:
            for proc in stack.procs:
                stop(proc)
        stop(other)
        log.close()
