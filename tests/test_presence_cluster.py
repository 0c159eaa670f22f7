"""Presence on a real Redis Cluster: channels on different masters, one roster each."""

from __future__ import annotations

import pytest

import django_ws
from tests.conftest import WS, wait_for
from tests.test_cluster import _channel, cluster, on_cluster, publish_command  # noqa: F401 - the fixtures
from uwsgi_ws.presence import Occupancy

pytestmark = pytest.mark.timeout(120)


def test_rosters_events_and_signals_on_a_cluster(cluster, on_cluster, project, facility):  # noqa: F811
    from uwsgi_ws.protocol import Audience, Kind, members_key, presence_events_key

    audiences = (Audience(Kind.BROADCAST), Audience(Kind.GROUP, "blue team"), Audience(Kind.USER, "bob"))
    # A facility whose channels live on different masters, none with the events stream.
    facility = next(
        name
        for name in (f"{facility}{i}" for i in range(200))
        if len({cluster.owner(_channel(name, a)) for a in audiences}) == 3
    )
    url = on_cluster.url(f"/ws/{facility}?subscribe-broadcast&subscribe-group&subscribe-user&presence")
    carol = WS(url, session=project.cookie("carol"))
    carol.ready()
    bob = WS(url, session=project.cookie("bob"))
    bob.ready()
    joins = sorted((f["type"], f["channel"], f["user"]) for f in (carol.next(), carol.next()))
    assert joins == [("join", "broadcast", "bob"), ("join", "group:blue team", "bob")]
    assert [m.user for m in django_ws.presence(facility, group="blue team").members] == ["bob", "carol"]
    assert django_ws.presence_count(facility, user="bob") == Occupancy(1, 1, 0)
    # Each channel's entries sit on its own master, in its slot.
    for audience in audiences:
        owner = cluster.owner(_channel(facility, audience))
        assert cluster.cli(owner, "EXISTS", members_key(_channel(facility, audience))).strip() == "1"
    bob.close()
    leaves = sorted((f["type"], f["channel"], f["user"]) for f in (carol.next(), carol.next()))
    assert leaves == [("leave", "broadcast", "bob"), ("leave", "group:blue team", "bob")]
    # The changes reached the project's stream, on whichever master holds it.
    from django_ws.publishing import get_redis

    def recorded() -> list[tuple[str, str]]:
        entries = get_redis().xrange(presence_events_key("ws"))
        return [
            (f[b"type"].decode(), f[b"user"].decode())
            for _, f in entries
            if f[b"channel"].decode().startswith("{ws:" + facility + ":")
        ]

    wait_for(lambda: recorded().count(("left", "bob")) == 3, what="bob's leaves in the stream")
    carol.close()
