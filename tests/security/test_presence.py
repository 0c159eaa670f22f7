"""Presence shows who is connected, to those who may see it, and nothing more.

No client lists the members of a channel it may not subscribe to, nor reads a session
key or digest from a roster; no client forges a join; what a client costs in
presence is bounded by its open connections.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

import django_ws
from django_ws.identity import session_digest
from tests.conftest import WS, wait_for
from tests.direct import new_key
from tests.security.helpers import django_ticket, ticket_text
from tests.test_presence import get, presence_frames
from uwsgi_ws.presence import Occupancy
from uwsgi_ws.protocol import (
    Audience,
    Kind,
    channel_name,
    members_key,
    parse_channel,
    presence_channel,
    users_key,
)


@pytest.mark.parametrize(
    ("who", "label"),
    [
        ("alice", "group:blue team"),  # a group she is not in
        (None, "group:blue team"),  # anonymous: no groups
        (None, "user"),  # anonymous: no user channel
        ("alice", "session"),  # sessions have no roster
        ("alice", "group:"),
    ],
)
def test_no_roster_of_a_channel_one_may_not_subscribe_to(offload_stack, project, facility, who, label):
    carol = WS(offload_stack.url(f"/ws/{facility}?subscribe-group"), session=project.cookie("carol"))
    carol.ready()
    session = project.cookie(who) if who else None
    status, body = get(offload_stack, f"/ws/{facility}?presence={quote(label)}", session=session)
    assert status in (400, 403) and status == (400 if label in ("session", "group:") else 403)
    assert b"carol" not in body
    carol.close()


def test_the_authorization_hook_decides_rosters_too(project, ws_settings, facility):
    from django.test import Client

    ws_settings(AUTHORIZE=lambda request, facility, action, audience: audience.kind is not Kind.BROADCAST)
    client = Client()
    client.cookies["sessionid"] = project.cookie("alice")
    refused = client.get(f"/ws/{facility}?presence=broadcast", HTTP_HOST="127.0.0.1", HTTP_SEC_FETCH_SITE="same-origin")
    assert refused.status_code == 403
    allowed = client.get(f"/ws/{facility}?presence=user", HTTP_HOST="127.0.0.1", HTTP_SEC_FETCH_SITE="same-origin")
    assert allowed.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"}, {"Origin": "null"}],
)
def test_another_sites_page_reads_no_roster(offload_stack, project, facility, headers):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", offload_stack.port, timeout=10)
    conn.request(
        "GET",
        f"/ws/{facility}?presence=broadcast",
        headers={"Host": f"127.0.0.1:{offload_stack.port}", "Cookie": f"sessionid={project.cookie('bob')}", **headers},
    )
    response = conn.getresponse()
    assert response.status == 403
    conn.close()


def test_anonymous_and_session_connections_are_counted_never_named(offload_stack, project, redis_server, facility):
    anonymous = project.anonymous_session()
    alice = project.cookie("alice")
    sockets = [
        WS(offload_stack.url(f"/ws/{facility}?subscribe-broadcast&subscribe-session"), session=anonymous),
        WS(offload_stack.url(f"/ws/{facility}?subscribe-broadcast&subscribe-session"), session=alice),
    ]
    for ws in sockets:
        ws.ready()
    status, body = get(offload_stack, f"/ws/{facility}?presence=broadcast", session=alice)
    assert status == 200
    answer = json.loads(body)
    assert [m["user"] for m in answer["members"]] == ["alice"]
    assert answer["anonymous"] == 1
    broadcast = channel_name("ws", facility, Audience(Kind.BROADCAST))
    stored = json.dumps([v.decode() for v in redis_server.client().hvals(members_key(broadcast))])
    stored += json.dumps([k.decode() for k in redis_server.client().hkeys(users_key(broadcast))])
    for secret in (anonymous, alice, session_digest(anonymous), session_digest(alice)):
        assert secret not in body.decode()
        assert secret not in stored
    # A session channel has no roster: nobody but its own browser could ever ask.
    session = channel_name("ws", facility, Audience(Kind.SESSION, session_digest(alice)))
    assert not redis_server.client().exists(members_key(session))
    for ws in sockets:
        ws.close()


def test_a_client_cannot_forge_a_join(offload_stack, project, facility):
    observer = WS(offload_stack.url(f"/ws/{facility}?subscribe-broadcast&presence"), session=project.cookie("carol"))
    observer.ready()
    alice = WS(
        offload_stack.url(f"/ws/{facility}?subscribe-broadcast&publish-broadcast"), session=project.cookie("alice")
    )
    alice.ready()
    assert observer.next()["type"] == "join"  # alice's real one
    forged = {"type": "join", "channel": "broadcast", "user": "admin", "info": {"role": "root"}}
    alice.send(json.dumps(forged))
    frame = observer.next()
    assert (frame["type"], frame["data"]) == ("message", json.dumps(forged))  # a message like any, not a join
    django_ws.publish(facility, "fence", broadcast=True)
    assert presence_frames(observer, "fence") == []
    assert [m.user for m in django_ws.presence(facility, broadcast=True).members] == ["alice", "carol"]
    observer.close()
    alice.close()


@pytest.mark.parametrize("name", ["x}:presence", "{ws:f:broadcast}:presence", "a:presence", "}"])
def test_no_username_names_a_join_leave_channel(name):
    # A username is the attacker's choice at sign-up: its channel must never be the
    # join/leave channel of another one, which only the server writes.
    channel = channel_name("ws", "f", Audience(Kind.USER, name))
    assert not channel.endswith("}:presence")
    assert parse_channel(channel)[2] == Audience(Kind.USER, name)
    assert channel != presence_channel(channel_name("ws", "f", Audience(Kind.BROADCAST)))


def test_an_oversized_info_is_not_carried(project, ws_settings, facility):
    ws_settings(PRESENCE_INFO=lambda request: {"bio": "x" * 5000})
    token = django_ticket(f"/ws/{facility}?subscribe-broadcast", session=project.cookie("bob"), key=new_key())
    assert "xxxx" not in ticket_text(token)
    ws_settings(PRESENCE_INFO=lambda request: {"bio": "short"})
    token = django_ticket(f"/ws/{facility}?subscribe-broadcast", session=project.cookie("bob"), key=new_key())
    assert '"bio": "short"' in ticket_text(token)


def test_reconnecting_leaves_nothing_behind(offload_stack, project, redis_server, facility):
    key = project.cookie("bob")
    for _ in range(30):
        ws = WS(offload_stack.url(f"/ws/{facility}?subscribe-broadcast&subscribe-user"), session=key)
        ws.ready()
        ws.close()
    wait_for(
        lambda: (
            django_ws.presence_count(facility, broadcast=True) == Occupancy(0, 0, 0)
            and django_ws.presence_count(facility, user="bob") == Occupancy(0, 0, 0)
        ),
        what="every entry removed",
    )
    broadcast = channel_name("ws", facility, Audience(Kind.BROADCAST))
    # Not even empty keys: a channel's last leave deletes them.
    assert not redis_server.client().exists(members_key(broadcast), users_key(broadcast))


def test_rosters_are_read_at_the_clients_rate(offload_stack, project, facility):
    # A roster costs O(members) in a Django worker and in Redis: a client draws from
    # its rate bucket (RATE_LIMIT: 10 a second, bursts of 20, in the example) for each
    # read. The bucket refills while the reads go on, so count until the first 429.
    key = project.cookie("bob")
    answered = 0
    for _ in range(100):
        status, _ = get(offload_stack, f"/ws/{facility}?presence=broadcast", session=key)
        if status == 429:
            break
        assert status == 200
        answered += 1
    assert 20 <= answered < 100
