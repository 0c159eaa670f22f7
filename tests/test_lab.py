"""Across real hosts (tests/lab.py): a Redis Cluster of three masters with a replica
each, two websocket hosts, one client host, each on its own address, sharded pub/sub.

Bounded: each test builds its own bed (about 10 s) and stays under a minute.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.parse
from typing import Any

import pytest

import django_ws
from tests.conftest import WS, stop, wait_for
from tests.lab import Lab, available
from tests.test_cluster import _channel
from uwsgi_ws.exceptions import PublishError
from uwsgi_ws.protocol import Audience, Kind

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(available() is not None, reason=f"multi-host bed: {available()}"),
]


@pytest.fixture
def lab(tmp_path, project, monkeypatch):
    import django_ws.conf

    with Lab(tmp_path) as bed:
        bed.start_cluster()
        # This process publishes (from the client host) on the bed's Cluster.
        monkeypatch.setenv("DJANGO_WS_REDIS_URL", bed.cluster_url)
        monkeypatch.setenv("DJANGO_WS_PUBLISH_COMMAND", "SPUBLISH")
        monkeypatch.setattr(django_ws.conf, "_cached", None)
        bed.start_websocket_hosts(project, DJANGO_WS_PUBLISH_COMMAND="SPUBLISH")
        yield bed


def _session_channel(facility: str, session_key: str) -> str:
    from django_ws.identity import session_digest

    return _channel(facility, Audience(Kind.SESSION, session_digest(session_key)))


def recover(positions: dict[str, list]) -> str:
    return "recover=" + urllib.parse.quote(json.dumps(positions))


def messages(frames: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(f["channel"], f["data"]) for f in frames if f["type"] == "message"]


def test_every_audience_across_hosts_and_a_client_moved_between_them_resumes(lab, project, facility):
    client = lab.hosts["client"]
    ws1, ws2 = lab.stacks["ws1"], lab.stacks["ws2"]
    alice, bob = project.cookie("alice"), project.cookie("bob")
    query = "subscribe-broadcast&subscribe-user&subscribe-group&subscribe-session&publish-broadcast"
    a = client.run(WS, ws1.url(f"/ws/{facility}?{query}"), session=alice)
    b = client.run(WS, ws2.url(f"/ws/{facility}?subscribe-broadcast&subscribe-group"), session=bob)
    a.ready()
    b.ready()
    # Published from the client host, received on both websocket hosts.
    client.run(django_ws.publish, facility, "to all", broadcast=True)
    client.run(django_ws.publish, facility, "to alice", users=["alice"])
    client.run(django_ws.publish, facility, "to red", groups=["red"])
    client.run(django_ws.publish, facility, "to blue", groups=["blue team"])
    client.run(django_ws.publish, facility, "to her session", sessions=[alice])
    got = [a.next() for _ in range(4)]
    assert sorted(messages(got)) == [
        ("broadcast", "to all"),
        ("group:red", "to red"),
        ("session", "to her session"),
        ("user", "to alice"),
    ]
    assert sorted(messages([b.next(), b.next()])) == [("broadcast", "to all"), ("group:blue team", "to blue")]
    # A client's own publish on ws1 reaches bob on ws2.
    a.send("from alice")
    assert messages([b.next()]) == [("broadcast", "from alice")]
    # Each websocket host holds one subscriber connection per master owning one of its
    # channels (its sockets' and the control channel carrying disconnect orders), and
    # none to the others.
    from django_ws.conf import get_settings
    from uwsgi_ws.protocol import control_channel

    control = lab.owner(control_channel(get_settings().prefix))
    alice_channels = [Audience(Kind.BROADCAST), Audience(Kind.USER, "alice"), Audience(Kind.GROUP, "red")]
    bob_channels = [Audience(Kind.BROADCAST), Audience(Kind.GROUP, "blue team")]
    for host, audiences in (("ws1", alice_channels), ("ws2", bob_channels)):
        owners = {control} | {lab.owner(_channel(facility, x)) for x in audiences}
        if host == "ws1":
            owners.add(lab.owner(_session_channel(facility, alice)))
        assert lab.hub_connections(host) == {m: int(m in owners) for m in lab.masters()}
    positions = {m["channel"]: [m["offset"], m["epoch"]] for m in got}
    a.close()

    # Alice comes back on the other websocket host and resumes exactly where she was.
    client.run(django_ws.publish, facility, "missed 1", broadcast=True)
    client.run(django_ws.publish, facility, "missed 2", users=["alice"])
    client.run(django_ws.publish, facility, "missed 3", broadcast=True)
    again = client.run(WS, ws2.url(f"/ws/{facility}?{query}&{recover(positions)}"), session=alice)
    frames = again.ready()
    # Her own publish too: she had not received it (no echo), so it is after her position.
    assert [d for c, d in messages(frames) if c == "broadcast"] == ["from alice", "missed 1", "missed 3"]
    assert [d for c, d in messages(frames) if c != "broadcast"] == ["missed 2"]
    assert [f["recovered"] for f in frames if f["type"] == "subscribed"] == [True, True, True, True]
    client.run(django_ws.publish, facility, "live", broadcast=True)
    assert messages([again.next()]) == [("broadcast", "live")]  # nothing repeated before it
    again.close()
    b.close()


class Reader(threading.Thread):
    """A client on the client host reading one broadcast stream until ``last``; when
    its websocket host stops answering it reconnects to ``fallback`` and recovers."""

    def __init__(self, lab: Lab, facility: str, first: str, fallback: str, last: int, timeout: float = 2) -> None:
        super().__init__(daemon=True)
        self.lab, self.facility, self.fallback, self.last = lab, facility, fallback, last
        self.timeout = timeout
        self.host = first
        self.offsets: list[int] = []
        self.data: list[str] = []
        self.moved_to: list[str] = []
        self.error: BaseException | None = None
        self.ws = self._open(first, None)
        self.ws.ready()

    def _open(self, host: str, since: list | None) -> WS:
        query = f"subscribe-broadcast&{recover({'broadcast': since})}" if since else "subscribe-broadcast"
        # Read timeout: the stream sends a message every few ms, so seconds of silence
        # mean the host is gone.
        url = self.lab.stacks[host].url(f"/ws/{self.facility}?{query}")
        return self.lab.hosts["client"].run(WS, url, timeout=self.timeout)

    def run(self) -> None:
        import websocket

        epoch = None
        try:
            while not self.offsets or self.offsets[-1] < self.last:
                try:
                    frame = self.ws.next()
                except (websocket.WebSocketTimeoutException, TimeoutError):
                    self.moved_to.append(self.fallback)
                    self.ws.conn.sock.close()  # no close handshake through a dead link
                    self.host = self.fallback
                    self.ws = self._open(self.fallback, [self.offsets[-1], epoch] if self.offsets else None)
                    continue
                if frame["type"] == "message":
                    self.offsets.append(frame["offset"])
                    self.data.append(frame["data"])
                    epoch = frame["epoch"]
                elif frame["type"] == "subscribed":
                    assert frame["recovered"] is True, frame
        except BaseException as exc:
            self.error = exc
        finally:
            self.ws.close()


def publish_all(lab: Lab, facility: str, texts: list[str], pause: float = 0.01) -> list[int]:
    """Publish ``texts`` from the client host, each retried until Redis takes it."""
    offsets = []
    for text in texts:
        deadline = time.monotonic() + 30
        while True:
            try:
                [published] = lab.hosts["client"].run(django_ws.publish, facility, text, broadcast=True)
                break
            except PublishError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        offsets.append(published.offset)
        time.sleep(pause)
    return offsets


def test_a_websocket_host_cut_mid_stream_its_clients_resume_on_the_other(lab, facility, ws_settings):
    ws_settings(HISTORY_SIZE=1000)  # the whole stream: a client is seconds behind when it moves
    readers = [Reader(lab, facility, "ws1", "ws2", 300) for _ in range(3)]
    bystander = Reader(lab, facility, "ws2", "ws1", 300)
    for reader in (*readers, bystander):
        reader.start()
    texts = [f"m{i}" for i in range(300)]
    cut = threading.Timer(1.0, lab.cut, args=("ws1",))  # about a third of the way
    cut.start()
    try:
        assert publish_all(lab, facility, texts) == list(range(1, 301))
    finally:
        cut.cancel()
    for reader in (*readers, bystander):
        reader.join(30)
        assert reader.error is None and not reader.is_alive()
        # Nothing lost, nothing twice, in order.
        assert reader.offsets == list(range(1, 301)) and reader.data == texts
    assert [r.moved_to for r in readers] == [["ws2"]] * 3
    assert bystander.moved_to == []
    # Healed, the host serves again: its Hub's connections survived or came back.
    lab.heal("ws1")
    late = lab.hosts["client"].run(WS, lab.stacks["ws1"].url(f"/ws/{facility}?subscribe-broadcast"), timeout=20)
    late.ready()
    publish_all(lab, facility, ["after the heal"])
    assert messages([late.next()]) == [("broadcast", "after the heal")]
    late.close()


def test_a_master_killed_its_replica_promoted_clients_recover(lab, facility):
    owner = lab.owner(_channel(facility, Audience(Kind.BROADCAST)))
    replica = lab.replicas()[owner]
    # Generous read timeouts: publishing pauses while the replica is promoted.
    readers = [Reader(lab, facility, "ws1", "ws2", 60, timeout=30), Reader(lab, facility, "ws2", "ws1", 60, timeout=30)]
    for reader in readers:
        reader.start()
    texts = [f"m{i}" for i in range(60)]
    assert publish_all(lab, facility, texts[:30]) == list(range(1, 31))
    # Everything written so far is on the replica too (replication is asynchronous).
    assert lab.cli(owner, "WAIT", "1", "5000").strip() == "1"
    stop(lab.redis[lab.redis_host(owner)], signal.SIGKILL)  # a node this bed started
    assert publish_all(lab, facility, texts[30:]) == list(range(31, 61))
    for reader in readers:
        reader.join(40)
        assert reader.error is None and not reader.is_alive()
        assert reader.offsets == list(range(1, 61)) and reader.data == texts
        assert reader.moved_to == []  # the websocket hosts followed; the clients noticed nothing
    assert lab.owner(_channel(facility, Audience(Kind.BROADCAST))) == replica


def test_a_slot_migrated_under_load_across_hosts_loses_nothing(lab, facility, ws_settings):
    from redis.crc import key_slot

    ws_settings(HISTORY_SIZE=1000)
    name = _channel(facility, Audience(Kind.BROADCAST))
    source = lab.owner(name)
    target = next(m for m in lab.masters() if m != source)
    readers = [
        Reader(lab, facility, "ws1", "ws2", 200, timeout=10),
        Reader(lab, facility, "ws2", "ws1", 200, timeout=10),
    ]
    for reader in readers:
        reader.start()
    texts = [f"m{i}" for i in range(200)]
    migration = threading.Timer(0.5, lab.migrate, args=(key_slot(name.encode()), source, target))
    migration.start()
    try:
        assert publish_all(lab, facility, texts[:150]) == list(range(1, 151))
    finally:
        migration.join(30)
    assert lab.owner(name) == target
    # Both hosts now listen on the new owner of the slot (and the stream goes on).
    wait_for(lambda: [lab.hub_connections(host)[target] for host in ("ws1", "ws2")] == [1, 1], what="the move")
    assert publish_all(lab, facility, texts[150:]) == list(range(151, 201))
    for reader in readers:
        reader.join(30)
        assert reader.error is None and not reader.is_alive()
        assert reader.offsets == list(range(1, 201)) and reader.data == texts
        assert reader.moved_to == []  # the websocket hosts followed the slot
