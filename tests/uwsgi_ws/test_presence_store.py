"""The presence scripts on a real Redis: counts per user, leases, reaping, sweeping."""

from __future__ import annotations

import json
import uuid

import pytest
from redis.crc import key_slot

from tests.conftest import wait_for
from uwsgi_ws import presence
from uwsgi_ws.presence import Change, Occupancy, PresenceTracker
from uwsgi_ws.protocol import (
    Audience,
    Kind,
    channel_name,
    members_key,
    presence_channel,
    presence_events_key,
    users_key,
    workers_key,
)


@pytest.fixture
def client(redis_server):
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def prefix(client):
    name = "p" + uuid.uuid4().hex[:8]
    yield name
    for key in client.scan_iter("{" + name + ":*"):
        client.delete(key)


def channel(prefix: str, group: str = "staff") -> str:
    return channel_name(prefix, "room", Audience(Kind.GROUP, group))


def stream(client, prefix: str) -> list[tuple[str, str]]:
    return [(f[b"type"].decode(), f[b"user"].decode()) for _, f in client.xrange(presence_events_key(prefix))]


def join(tracker: PresenceTracker, conn: str, chan: str, user: str, ttl: float = 30.0) -> None:
    tracker.join(conn, [chan], user=user, info={"n": conn}, ttl=ttl, stream_size=100, since=1.0)


def test_a_user_joins_with_the_first_tab_and_leaves_with_the_last(client, prefix):
    tracker = PresenceTracker(client, prefix)
    chan = channel(prefix)
    join(tracker, "a1", chan, "alice")
    join(tracker, "a2", chan, "alice")
    join(tracker, "x1", chan, "")
    assert presence.count(client, chan) == Occupancy(connections=3, users=1, anonymous=1)
    tracker.leave("a1", [chan], user="alice", stream_size=100)
    assert stream(client, prefix) == [("occupied", ""), ("joined", "alice")]
    tracker.leave("a2", [chan], user="alice", stream_size=100)
    tracker.leave("x1", [chan], user="", stream_size=100)
    assert stream(client, prefix) == [("occupied", ""), ("joined", "alice"), ("left", "alice"), ("vacated", "")]
    assert presence.count(client, chan) == Occupancy(0, 0, 0)
    assert not client.exists(members_key(chan), workers_key(chan), users_key(chan))
    tracker.stop()


def test_joining_twice_counts_once(client, prefix):
    tracker = PresenceTracker(client, prefix)
    chan = channel(prefix)
    join(tracker, "a1", chan, "alice")
    join(tracker, "a1", chan, "alice")  # a retried call
    assert presence.count(client, chan) == Occupancy(1, 1, 0)
    tracker.stop()


def test_the_roster_lists_users_once_with_their_earliest_tab(client, prefix):
    tracker = PresenceTracker(client, prefix)
    chan = channel(prefix)
    tracker.join("late", [chan], user="bob", info={"tab": 2}, ttl=30, stream_size=0, since=20.0)
    tracker.join("early", [chan], user="bob", info={"tab": 1}, ttl=30, stream_size=0, since=10.0)
    tracker.join("anon", [chan], user="", info=None, ttl=30, stream_size=0, since=5.0)
    roster = presence.read(client, chan)
    assert roster.to_dict() == {
        "members": [{"user": "bob", "connections": 2, "since": 10.0, "info": {"tab": 1}}],
        "users": 1,
        "anonymous": 1,
        "connections": 3,
    }
    tracker.stop()


def test_a_dead_workers_entries_are_reaped_by_a_live_one_with_the_leaves(client, prefix):
    dead, live = (
        PresenceTracker(client, prefix, worker="dead", background=False),
        PresenceTracker(client, prefix, worker="live", background=False),
    )
    chan = channel(prefix)
    join(dead, "a1", chan, "alice", ttl=1.0)
    join(dead, "b1", chan, "bob", ttl=1.0)
    join(live, "b2", chan, "bob", ttl=30.0)
    dead.stop()  # never renews again, as if killed
    # Read skips the dead worker's entries as soon as its lease ends, before any reaping.
    wait_for(lambda: presence.read(client, chan).connections == 1, timeout=5, what="lease end")
    changes = wait_for(live.renew, timeout=5, what="the reaping")
    assert changes == [Change("left", chan, "alice")]  # bob still has a tab on the live worker
    assert presence.count(client, chan) == Occupancy(1, 1, 0)
    assert stream(client, prefix)[-1] == ("left", "alice")
    assert live.renew() == []  # reaped once
    live.stop()


def test_a_channel_whose_workers_all_died_is_swept_once(client, prefix):
    dead = PresenceTracker(client, prefix, worker="dead", background=False)
    chan = channel(prefix)
    join(dead, "a1", chan, "alice", ttl=1.0)
    dead.stop()
    # Any process sweeps the project's index: several at once remove each entry once.
    changes = wait_for(lambda: presence.sweep(client, prefix, stream_size=100), timeout=5, what="sweep")
    assert changes == [Change("left", chan, "alice"), Change("vacated", chan)]
    assert presence.sweep(client, prefix, stream_size=100) == []
    assert client.zcard("{" + prefix + ":presence}") == 0
    assert presence.count(client, chan) == Occupancy(0, 0, 0)


def test_leaves_and_joins_reach_the_channels_listeners(client, prefix):
    tracker = PresenceTracker(client, prefix)
    chan = channel(prefix)
    pubsub = client.pubsub()
    pubsub.subscribe(presence_channel(chan))
    wait_for(lambda: pubsub.get_message(timeout=0.1), what="subscription")
    join(tracker, "a1", chan, "alice")
    tracker.leave("a1", [chan], user="alice", stream_size=100)
    received = []
    while len(received) < 2:
        message = pubsub.get_message(timeout=5)
        assert message is not None
        received.append(json.loads(message["data"].split(b"\n", 4)[4]))
    assert received == [{"type": "join", "user": "alice", "info": {"n": "a1"}}, {"type": "leave", "user": "alice"}]
    pubsub.close()
    tracker.stop()


def test_every_key_of_a_channel_is_in_its_slot(prefix):
    chan = channel(prefix, "a{b}:c")
    slots = {key_slot(k.encode()) for k in (chan, members_key(chan), workers_key(chan), users_key(chan))}
    slots.add(key_slot(presence_channel(chan).encode()))
    assert slots == {key_slot(chan.encode())}


def test_the_stream_stays_bounded(client, prefix):
    tracker = PresenceTracker(client, prefix)
    chan = channel(prefix)
    for i in range(300):
        tracker.join(f"c{i}", [chan], user=f"u{i}", info=None, ttl=30, stream_size=50, since=1.0)
        tracker.leave(f"c{i}", [chan], user=f"u{i}", stream_size=50)
    # XADD MAXLEN ~: trimmed by whole nodes of the stream (100 entries by default).
    assert client.xlen(presence_events_key(prefix)) <= 50 + 100
    tracker.stop()


def test_a_worker_left_with_no_connection_still_records_the_leaves_it_sweeps(client, prefix):
    dead = PresenceTracker(client, prefix, worker="dead", background=False)
    idle = PresenceTracker(client, prefix, worker="idle", background=False)
    join(idle, "i1", channel(prefix, "other"), "bob")
    idle.leave("i1", [channel(prefix, "other")], user="bob", stream_size=100)  # holds nothing now
    join(dead, "a1", channel(prefix), "alice", ttl=1.0)
    dead.stop()
    wait_for(lambda: any(c.kind == "left" for c in idle.renew()), timeout=5, what="the sweep")
    assert stream(client, prefix)[-2:] == [("left", "alice"), ("vacated", "")]
