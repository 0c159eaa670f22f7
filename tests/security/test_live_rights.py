"""Rights that change while sockets live: one subscription ends, the socket stays.

``django_ws.unsubscribe()`` (and, by default, removing a user from a group) stops
delivery on that channel at once, on every server, while the connection and its
other subscriptions go on.
"""

from __future__ import annotations

import http.client
import uuid

import pytest

import django_ws
from tests.conftest import WS


def until_fence(ws: WS, fence: str = "fence") -> list[dict]:
    """Return every frame (but heartbeats) before the broadcast message ``fence``."""
    frames = []
    while True:
        frame = ws.next()
        if frame["type"] == "message" and frame["data"] == fence:
            return frames
        frames.append(frame)


@pytest.fixture
def team(project):
    """A fresh group with alice and carol in it."""
    from django.contrib.auth.models import Group

    group = Group.objects.create(name="team " + uuid.uuid4().hex[:8])
    group.user_set.add(project.users["alice"], project.users["carol"])
    yield group
    group.delete()


def test_unsubscribe_ends_one_subscription_at_once_and_keeps_the_socket(stack, project, connect, facility, team):
    alice = connect("subscribe-group&subscribe-broadcast", session=project.cookie("alice"))
    carol = connect("subscribe-group&subscribe-broadcast", session=project.cookie("carol"))
    alice.ready()
    carol.ready()
    assert django_ws.unsubscribe(users=["alice"], group=team.name) >= 1
    django_ws.publish(facility, "team secret", groups=[team])  # right after: must not reach alice
    django_ws.publish(facility, "fence", broadcast=True)
    assert until_fence(alice) == [{"type": "unsubscribed", "channel": f"group:{team.name}"}]
    assert [f["data"] for f in until_fence(carol)] == ["team secret"]
    django_ws.publish(facility, "still here", broadcast=True)
    assert alice.next()["data"] == "still here"  # the socket and its other channel go on
    django_ws.publish(facility, "team again", groups=[team])
    django_ws.publish(facility, "fence", broadcast=True)
    assert until_fence(alice) == []


def test_removing_a_user_from_a_group_ends_that_subscription(offload_stack, project, facility, team):
    url = offload_stack.url(f"/ws/{facility}?subscribe-group&subscribe-broadcast")
    alice = WS(url, session=project.cookie("alice"))
    alice.ready()
    team.user_set.remove(project.users["alice"])  # m2m_changed, from the group's side
    django_ws.publish(facility, "after removal", groups=[team])
    django_ws.publish(facility, "fence", broadcast=True)
    assert until_fence(alice) == [{"type": "unsubscribed", "channel": f"group:{team.name}"}]
    carol = WS(url, session=project.cookie("carol"))
    carol.ready()
    project.users["carol"].groups.clear()  # from the user's side, every group at once
    try:
        django_ws.publish(facility, "after clear", groups=[team])
        django_ws.publish(facility, "fence", broadcast=True)
        frames = until_fence(carol)
        assert {f["type"] for f in frames} == {"unsubscribed"}  # and no message
        assert sorted(f["channel"] for f in frames) == sorted(["group:blue team", f"group:{team.name}"])
    finally:
        from django.contrib.auth.models import Group

        project.users["carol"].groups.set([Group.objects.get(name="blue team")])
    alice.close()
    carol.close()


def test_group_removal_can_be_left_alone(offload_stack, project, facility, team, ws_settings):
    ws_settings(UNSUBSCRIBE_ON_GROUP_REMOVAL=False)
    alice = WS(
        offload_stack.url(f"/ws/{facility}?subscribe-group&subscribe-broadcast"), session=project.cookie("alice")
    )
    alice.ready()
    project.users["alice"].groups.remove(team)
    django_ws.publish(facility, "still delivered", groups=[team])
    django_ws.publish(facility, "fence", broadcast=True)
    assert [f.get("data") for f in until_fence(alice)] == ["still delivered"]
    alice.close()


def test_an_unsubscribed_member_leaves_the_roster(offload_stack, project, facility, team):
    url = offload_stack.url(f"/ws/{facility}?subscribe-group&presence")
    carol = WS(url, session=project.cookie("carol"))
    carol.ready()
    alice = WS(url, session=project.cookie("alice"))
    alice.ready()
    assert carol.next() == {"type": "join", "channel": f"group:{team.name}", "user": "alice", "info": {"name": "alice"}}
    django_ws.unsubscribe(users=["alice"], group=team.name, facility=facility)
    assert carol.next() == {"type": "leave", "channel": f"group:{team.name}", "user": "alice"}
    assert [m.user for m in django_ws.presence(facility, group=team).members] == ["carol"]
    alice.close()
    carol.close()


def test_event_streams_are_unsubscribed_too(offload_stack, project, facility, team):
    conn = http.client.HTTPConnection("127.0.0.1", offload_stack.port, timeout=10)
    conn.request(
        "GET",
        f"/ws/{facility}?subscribe-group",
        headers={
            "Accept": "text/event-stream",
            "Cookie": f"sessionid={project.cookie('alice')}",
            "Host": f"127.0.0.1:{offload_stack.port}",
        },
    )
    response = conn.getresponse()
    received = b""
    while b"event: ready" not in received:
        received += response.read1(65536)
    django_ws.unsubscribe(users=["alice"], group=team.name)
    while b"event: unsubscribed" not in received:
        received += response.read1(65536)
    assert f'event: unsubscribed\ndata: {{"type":"unsubscribed","channel":"group:{team.name}"}}\n'.encode() in received
    conn.close()


def test_another_facility_is_spared(offload_stack, project, facility, team):
    alice = WS(
        offload_stack.url(f"/ws/{facility}?subscribe-group&subscribe-broadcast"), session=project.cookie("alice")
    )
    alice.ready()
    django_ws.unsubscribe(users=["alice"], group=team, facility=facility + "x")
    django_ws.publish(facility, "kept", groups=[team])
    django_ws.publish(facility, "fence", broadcast=True)
    assert [f.get("data") for f in until_fence(alice)] == ["kept"]
    alice.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"group": "x"},
        {"users": ["a"]},
        {"users": ["a"], "group": "x", "broadcast": True},
        {"users": ["a"], "group": "x", "facility": "../x"},
    ],
)
def test_unsubscribe_refuses_vague_orders(project, kwargs):
    with pytest.raises(ValueError):
        django_ws.unsubscribe(**kwargs)
