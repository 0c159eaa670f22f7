"""Presence: who is connected per channel, on every server and across instances.

Real servers, real websockets: members and their tabs, anonymous connections counted
and not listed, the browser's GET, a killed worker's members gone within the TTL.
"""

from __future__ import annotations

import http.client
import json
import os
import signal

import pytest

import django_ws
from tests.conftest import WS, ancestors, start_stack, stop, wait_for
from uwsgi_ws.presence import Occupancy


def roster(facility: str, **channel):
    return django_ws.presence(facility, **channel).to_dict()


def members(facility: str, **channel) -> dict[str, int]:
    return {m["user"]: m["connections"] for m in roster(facility, **channel)["members"]}


def get(stack, path: str, session: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    headers = {"Host": f"127.0.0.1:{stack.port}", "Sec-Fetch-Site": "same-origin"}
    if session:
        headers["Cookie"] = f"sessionid={session}"
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_members_tabs_and_anonymous_counts(stack, project, connect, facility):
    alice, bob = project.cookie("alice"), project.cookie("bob")
    tabs = [connect("subscribe-broadcast", session=alice) for _ in range(2)]
    others = [connect("subscribe-broadcast", session=bob), connect("subscribe-broadcast")]
    for ws in tabs + others:
        ws.ready()
    listed = roster(facility, broadcast=True)
    assert {m["user"]: m["connections"] for m in listed["members"]} == {"alice": 2, "bob": 1}
    assert (listed["anonymous"], listed["connections"], listed["users"]) == (1, 4, 2)
    assert django_ws.presence_count(facility, broadcast=True) == Occupancy(connections=4, users=2, anonymous=1)
    # What a member shows: the example's PRESENCE_INFO, and never a session.
    [first] = [m for m in listed["members"] if m["user"] == "alice"]
    assert first["info"] == {"name": "alice"}
    assert alice not in json.dumps(listed)
    tabs[0].close()
    wait_for(lambda: members(facility, broadcast=True) == {"alice": 1, "bob": 1}, what="one tab closed")
    for ws in tabs[1:] + others:
        ws.close()
    wait_for(lambda: django_ws.presence_count(facility, broadcast=True) == Occupancy(0, 0, 0), what="all gone")
    assert roster(facility, broadcast=True)["members"] == []


def test_group_and_user_channels(stack, project, connect, facility):
    bob, carol = project.cookie("bob"), project.cookie("carol")
    for key in (bob, carol):
        connect("subscribe-group&subscribe-user&subscribe-session", session=key).ready()
    assert members(facility, group="blue team") == {"bob": 1, "carol": 1}
    assert members(facility, user="bob") == {"bob": 1}
    assert members(facility, group="red") == {}


def test_the_browser_reads_a_roster_it_may_subscribe_to(stack, project, connect, facility):
    carol = project.cookie("carol")
    connect("subscribe-group", session=carol).ready()
    status, body = get(stack, f"/ws/{facility}?presence=group:blue%20team", session=carol)
    assert status == 200
    answer = json.loads(body)
    assert answer["channel"] == "group:blue team"
    assert [(m["user"], m["connections"]) for m in answer["members"]] == [("carol", 1)]


def test_a_killed_workers_members_leave_within_the_ttl(project, redis_server, tmp_path, facility):
    stack = start_stack("offload", project, tmp_path, DJANGO_WS_PRESENCE_TTL="2", DJANGO_WS_WORKERS="2")
    try:
        url = stack.url(f"/ws/{facility}?subscribe-broadcast")
        sockets = []
        for _ in range(40):  # until both workers hold someone
            ws = WS(url, session=project.cookie("alice" if len(sockets) % 2 else "bob"))
            ws.ready()
            sockets.append(ws)
            if (
                len(
                    [
                        p
                        for p, c in redis_server.worker_connections().items()
                        if c["hub"] and stack.procs[0].pid in ancestors(p)
                    ]
                )
                >= 2
                and len(sockets) >= 4
            ):
                break
        workers = [
            p for p, c in redis_server.worker_connections().items() if c["hub"] and stack.procs[0].pid in ancestors(p)
        ]
        assert len(workers) == 2
        before = django_ws.presence_count(facility, broadcast=True).connections
        assert before == len(sockets)
        os.kill(workers[0], signal.SIGKILL)  # a worker of the stack this test started
        # The other worker renews its lease every TTL/3 and removes the dead one's entries.
        wait_for(
            lambda: 0 < django_ws.presence_count(facility, broadcast=True).connections < before,
            timeout=10,
            what="the dead worker's entries removed",
        )
        alive = django_ws.presence(facility, broadcast=True).connections
        assert alive == django_ws.presence_count(facility, broadcast=True).connections
        for ws in sockets:
            try:
                ws.close()
            except OSError:
                pass
    finally:
        for proc in stack.procs:
            stop(proc)


def presence_frames(ws: WS, fence: str) -> list[tuple[str, str]]:
    """Read until the message ``fence``; return the (type, user) of the join/leave frames."""
    seen = []
    while True:
        frame = ws.next()
        if frame["type"] in ("join", "leave"):
            seen.append((frame["type"], frame["user"]))
        elif frame["type"] == "message" and frame["data"] == fence:
            return seen


def test_join_and_leave_once_per_user_not_per_tab(stack, project, connect, facility):
    observer = connect("subscribe-broadcast&presence", session=project.cookie("carol"))
    observer.ready()
    alice = project.cookie("alice")
    first = connect("subscribe-broadcast", session=alice)
    first.ready()
    frame = observer.next()
    assert frame == {"type": "join", "channel": "broadcast", "user": "alice", "info": {"name": "alice"}}
    second = connect("subscribe-broadcast", session=alice)
    second.ready()
    anonymous = connect("subscribe-broadcast")
    anonymous.ready()
    second.close()
    anonymous.close()
    wait_for(lambda: django_ws.presence_count(facility, broadcast=True).connections == 2, what="tab closed")
    first.close()
    frame = observer.next()
    assert frame == {"type": "leave", "channel": "broadcast", "user": "alice"}
    django_ws.publish(facility, "fence", broadcast=True)
    assert presence_frames(observer, "fence") == []  # nothing for the second tab, nothing anonymous


def test_without_asking_no_presence_frames(stack, project, connect, facility):
    plain = connect("subscribe-broadcast", session=project.cookie("carol"))
    plain.ready()
    connect("subscribe-broadcast", session=project.cookie("alice")).ready()
    django_ws.publish(facility, "fence", broadcast=True)
    assert presence_frames(plain, "fence") == []


def test_event_streams_get_join_and_leave_events(offload_stack, project, facility):
    conn = http.client.HTTPConnection("127.0.0.1", offload_stack.port, timeout=10)
    conn.request(
        "GET",
        f"/ws/{facility}?subscribe-broadcast&presence",
        headers={"Accept": "text/event-stream", "Host": f"127.0.0.1:{offload_stack.port}"},
    )
    response = conn.getresponse()
    assert response.status == 200
    received = b""
    while b"event: ready" not in received:
        received += response.read1(65536)
    bob = WS(offload_stack.url(f"/ws/{facility}?subscribe-broadcast"), session=project.cookie("bob"))
    bob.ready()
    bob.close()
    while b"event: leave" not in received:
        received += response.read1(65536)
    assert b'event: join\ndata: {"type":"join","channel":"broadcast","user":"bob","info":{"name":"bob"}}\n' in received
    assert b'event: leave\ndata: {"type":"leave","channel":"broadcast","user":"bob"}\n' in received
    conn.close()


def test_two_websocket_instances_share_one_roster_and_its_events(project, tmp_path, facility):
    """OFFLOAD_TO with two instances: hand-overs take turns, the roster and the
    join/leave events span both."""
    import subprocess

    from tests.conftest import ROOT, UWSGI, unix_socket_open

    first, second = tmp_path / "ws1.sock", tmp_path / "ws2.sock"
    env = {**os.environ, **project.env, "DJANGO_WS_OFFLOAD_TO": str(second), "DJANGO_WS_ASYNC": "100"}
    log = (tmp_path / "second.log").open("wb")
    other = subprocess.Popen(
        [str(UWSGI), "--ini", "uwsgi.ini.example:websocket"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    stack = None
    try:
        wait_for(lambda: unix_socket_open(str(second)), what="second websocket instance", timeout=30)
        stack = start_stack(
            "offload", project, tmp_path, DJANGO_WS_OFFLOAD_TO=str(first), EXAMPLE_OFFLOAD_TO=f"{first},{second}"
        )
        url = stack.url(f"/ws/{facility}?subscribe-broadcast&presence")
        observer = WS(url, session=project.cookie("carol"))  # on one instance
        observer.ready()
        tabs = [WS(url, session=project.cookie("alice")) for _ in range(2)]  # one on each
        for ws in tabs:
            ws.ready()
        assert members(facility, broadcast=True) == {"alice": 2, "carol": 1}
        bob = WS(url, session=project.cookie("bob"))
        bob.ready()
        for ws in tabs:
            ws.close()
        bob.close()
        wait_for(lambda: members(facility, broadcast=True) == {"carol": 1}, what="leaves")
        events = []
        while len(events) < 4:
            frame = observer.next()
            events.append((frame["type"], frame["user"]))
        assert sorted(events) == [("join", "alice"), ("join", "bob"), ("leave", "alice"), ("leave", "bob")]
        assert events.index(("join", "alice")) < events.index(("leave", "alice"))
        django_ws.publish(facility, "fence", broadcast=True)
        assert presence_frames(observer, "fence") == []
        observer.close()
        # uWSGI logs a request when it ends: the second instance served some of them.
        wait_for(
            lambda: (tmp_path / "second.log").read_text().count(f"GET /ws/{facility}") >= 2,
            what="the second instance's request log",
        )
    finally:
        if stack is not None:
            for proc in stack.procs:
                stop(proc)
        stop(other)
        log.close()


def test_a_killed_workers_users_leave_when_its_lease_ends(project, redis_server, tmp_path, facility):
    """One worker, SIGKILLed: nobody cleans up. The respawned worker, serving again,
    reaps the dead one's entries when their lease ends and announces the leaves."""
    stack = start_stack("offload", project, tmp_path, DJANGO_WS_PRESENCE_TTL="2")
    try:
        url = stack.url(f"/ws/{facility}?subscribe-broadcast&presence")
        alice = WS(url, session=project.cookie("alice"))
        alice.ready()
        carol = WS(url, session=project.cookie("carol"))
        carol.ready()
        [worker] = [
            p for p, c in redis_server.worker_connections().items() if c["hub"] and stack.procs[0].pid in ancestors(p)
        ]
        os.kill(worker, signal.SIGKILL)  # the worker of the stack this test started
        for ws in (alice, carol):
            ws.conn.settimeout(10)
            with pytest.raises((OSError, AssertionError, *websocket_errors())):
                while True:
                    ws.next()

        def reconnected() -> WS | None:
            try:
                ws = WS(url, session=project.cookie("carol"))
                ws.ready()
                return ws
            except (OSError, *websocket_errors()):
                return None

        carol = wait_for(reconnected, what="the respawned worker")
        carol.conn.settimeout(15)  # the TTL (2 s) and a renewal interval, with room to spare
        frame = carol.next()
        assert frame == {"type": "leave", "channel": "broadcast", "user": "alice"}
        assert [m.user for m in django_ws.presence(facility, broadcast=True).members] == ["carol"]
        carol.close()
    finally:
        for proc in stack.procs:
            stop(proc)


def websocket_errors() -> tuple[type[BaseException], ...]:
    import websocket

    return (websocket.WebSocketException,)
