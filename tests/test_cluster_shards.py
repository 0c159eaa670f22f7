"""Sharded pub/sub on a real loopback Redis Cluster: the ShardedHub, SPUBLISH, moves."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import pytest
from redis.crc import key_slot

from tests.conftest import stop, wait_for
from tests.test_cluster import Cluster
from tests.uwsgi_ws.test_hub import Listener
from uwsgi_ws.exceptions import PublishError
from uwsgi_ws.hub import parse_moved
from uwsgi_ws.protocol import KIND_TEXT, Audience, Kind, channel_name, log_key, meta_key
from uwsgi_ws.redis_url import make_client, node_factory
from uwsgi_ws.shards import ShardedHub, parse_slots
from uwsgi_ws.store import Store

pytestmark = pytest.mark.timeout(120)

HUB_NAME = "test-shards"


# ----------------------------------------------------------------- pure logic


@pytest.mark.parametrize(
    "audience", [Audience(Kind.BROADCAST), Audience(Kind.USER, "al ice"), Audience(Kind.GROUP, "r{e}d")]
)
def test_a_channel_and_its_keys_share_one_slot(audience):
    # The publish script runs on the master of the keys; the subscription goes to the
    # master of the channel: they must be the same node.
    name = channel_name("p", "chat", audience)
    assert key_slot(name.encode()) == key_slot(meta_key(name).encode()) == key_slot(log_key(name).encode())


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("MOVED 3999 127.0.0.1:6381", (3999, "127.0.0.1", 6381)),
        ("MOVED 12 [::1]:7000", (12, "::1", 7000)),
        ("ASK 3999 127.0.0.1:6381", None),
        ("MOVED x 127.0.0.1:6381", None),
        ("CROSSSLOT Keys in request don't hash to the same slot", None),
    ],
)
def test_moved_answers(text, parsed):
    assert parse_moved(text) == parsed


def test_slot_map_replies():
    reply = [
        [0, 5460, [b"192.0.2.11", 6379, b"id1"], [b"192.0.2.21", 6379, b"id4"]],
        [5461, 10922, [b"", 7001, b"id2"]],
    ]
    assert parse_slots(reply, ("192.0.2.12", 7001)) == (
        [(0, 5460, ("192.0.2.11", 6379)), (5461, 10922, ("192.0.2.12", 7001))],
        [("192.0.2.11", 6379), ("192.0.2.21", 6379), ("192.0.2.12", 7001)],
    )


# ----------------------------------------------------------------- real Cluster


@pytest.fixture
def sharded(tmp_path):
    """A Cluster of three masters with one replica each (failover within seconds)."""
    cluster = Cluster(tmp_path, replicas=1, node_timeout=1000)
    client = make_client(cluster.url, socket_timeout=5)
    store = Store(client, publish_command="SPUBLISH")
    hub = ShardedHub(
        [("127.0.0.1", cluster.nodes[0].port)],
        node_factory(cluster.url, socket_timeout=30, client_name=HUB_NAME),
        store=store,
        refresh_interval=0.2,
    )
    yield cluster, hub, store
    hub.stop()
    client.close()
    cluster.stop()


def masters(cluster: Cluster) -> list[int]:
    return sorted(row["port"] for row in cluster.table() if row["master"] and row["slots"])


def hub_connections(cluster: Cluster) -> dict[int, int]:
    """Subscriber connections of the Hub per live node."""
    counts = {}
    for node in cluster.nodes:
        if node.proc.poll() is None:
            counts[node.port] = sum(1 for c in node.client().client_list() if c.get("name") == HUB_NAME)
    return counts


def channels_on(cluster: Cluster, count: int, *, per_master: int = 1) -> dict[int, list[str]]:
    """``per_master`` fresh channel names for ``count`` different masters."""
    found: dict[int, list[str]] = {}
    tag = uuid.uuid4().hex[:6]
    for i in range(2000):
        name = "{" + f"t:f{tag}{i}:broadcast" + "}"
        owner = cluster.owner(name)
        if len(found.get(owner, [])) < per_master and (owner in found or len(found) < count):
            found.setdefault(owner, []).append(name)
        if len(found) == count and all(len(v) == per_master for v in found.values()):
            return found
    raise LookupError("no channels spread over the masters")


def publish(store: Store, name: str, text: str) -> int:
    [published] = store.publish([name], KIND_TEXT, text.encode(), history_size=1000, history_ttl=120)
    return published.offset


def test_one_connection_per_master_in_use_and_delivery_across_masters(sharded):
    cluster, hub, store = sharded
    spread = channels_on(cluster, 2, per_master=2)  # two of the three masters
    names = [n for group in spread.values() for n in group]
    listeners = [Listener() for _ in range(3)]
    for listener in listeners:
        hub.subscribe(listener, names, timeout=10)
    # One connection on each master that owns a subscribed channel, none elsewhere,
    # whatever the number of channels and listeners.
    assert hub_connections(cluster) == {port: int(port in spread) for port in hub_connections(cluster)}
    for name in names:
        assert publish(store, name, f"to {name}") == 1
    for listener in listeners:
        wait_for(lambda lst=listener: len(lst.messages) == len(names), what="every message")
        assert sorted(lst_name for lst_name, _, _ in listener.messages) == sorted(names)
        assert all(payload == f"to {n}".encode() for n, _, payload in listener.messages)
    # A master left without subscribed channels loses its connection.
    gone_port, gone = next(iter(spread.items()))
    for listener in listeners:
        hub.unsubscribe(listener, gone)
    wait_for(lambda: hub_connections(cluster)[gone_port] == 0, what="the idle master's connection closed")
    assert hub.nodes == [("127.0.0.1", p) for p in sorted(spread) if p != gone_port]


def test_a_slot_migrated_under_load_loses_and_duplicates_nothing(sharded):
    cluster, hub, store = sharded
    [(source, [name])] = channels_on(cluster, 1).items()
    target = next(p for p in masters(cluster) if p != source)
    listener = Listener()
    hub.subscribe(listener, [name], timeout=10)
    sent: list[int] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def publisher() -> None:
        # 400 messages, one every 2 ms or so: the migration happens in the middle.
        for i in range(400):
            try:
                sent.append(publish(store, name, f"m{i}"))
            except PublishError as exc:
                failures.append(exc)
            time.sleep(0.002)
        done.set()

    thread = threading.Thread(target=publisher)
    thread.start()
    wait_for(lambda: len(sent) >= 100, what="load before the migration")
    cluster.migrate(key_slot(name.encode()), source, target, between=lambda: time.sleep(0.05))
    thread.join(60)
    assert done.is_set() and failures == []
    assert sent == list(range(1, 401))
    wait_for(lambda: len(listener.messages) >= 400, what="every message", timeout=30)
    time.sleep(0.2)  # nothing more may come: a duplicate would arrive within this
    assert [offset for _, offset, _ in listener.messages] == list(range(1, 401))
    assert [payload for _, _, payload in listener.messages] == [f"m{i}".encode() for i in range(400)]
    # The subscription followed the slot to its new master.
    assert hub.moves == 1 and hub.nodes == [("127.0.0.1", target)]
    wait_for(lambda: hub_connections(cluster)[source] == 0, what="the old master's connection closed")
    assert hub_connections(cluster)[target] == 1


def test_a_master_killed_its_replica_promoted_delivery_resumes_with_recovery(sharded):
    cluster, hub, store = sharded
    [(victim, [name])] = channels_on(cluster, 1).items()
    ids = {row["id"]: row["port"] for row in cluster.table()}
    replica = next(row["port"] for row in cluster.table() if ids.get(row["of"]) == victim)
    listener = Listener()
    hub.subscribe(listener, [name], timeout=10)
    for i in range(5):
        publish(store, name, f"before {i}")
    wait_for(lambda: len(listener.messages) == 5, what="the first messages")
    # Everything written so far has reached the replica: WAIT on the master.
    assert cluster.node(victim).client().execute_command("WAIT", 1, 5000) == 1
    stop(cluster.node(victim).proc, signal.SIGKILL)  # a node this test started

    def publish_once_promoted(text: str) -> int:
        while True:
            try:
                return publish(store, name, text)
            except PublishError:
                time.sleep(0.1)  # the replica is not promoted yet

    offsets = [publish_once_promoted(f"after {i}") for i in range(5)]
    assert offsets == [6, 7, 8, 9, 10]
    wait_for(lambda: len(listener.messages) == 10, what="the messages after the failover", timeout=30)
    assert [offset for _, offset, _ in listener.messages] == list(range(1, 11))
    assert hub.nodes == [("127.0.0.1", replica)]
    publish(store, name, "live")
    wait_for(lambda: len(listener.messages) == 11, what="a live message on the new master")
    assert listener.messages[-1][2] == b"live"
