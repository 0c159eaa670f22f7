"""Redis Cluster: three real masters on loopback, the whole stack on a redis+cluster:// URL."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import django_ws
from tests.conftest import WS, free_port, start_redis, start_stack, stop, wait_for
from uwsgi_ws.config import Config
from uwsgi_ws.exceptions import ConfigurationError
from uwsgi_ws.redis_url import check_publish_command, check_url, parse_cluster_url

pytestmark = pytest.mark.timeout(120)

REDIS_CLI = "/usr/bin/redis-cli"


def test_cluster_urls():
    target = parse_cluster_url("redis+cluster://:s%40cret@10.0.0.1:7000,[::1]:7001")
    assert target.nodes == (("10.0.0.1", 7000), ("::1", 7001)) and target.password == "s@cret"
    assert parse_cluster_url("redis+cluster://h:7000/0").nodes == (("h", 7000),)
    for bad in ("redis+cluster://h", "redis+cluster://h:7000/3", "redis+cluster://:7000"):
        with pytest.raises(ConfigurationError):
            check_url(bad)
    # Sharded pub/sub on a Cluster: one subscriber connection per master in use.
    assert check_publish_command("SPUBLISH", "redis+cluster://h:7000") == "SPUBLISH"


def next_message(ws: WS) -> dict:
    while True:
        frame = ws.next()
        if frame["type"] == "message":
            return frame
        assert frame["type"] == "subscribed" and frame["recovered"] is True, frame


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    import socket

    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class Cluster:
    """A loopback Cluster: ``masters`` masters with ``replicas`` replicas each (promoted
    when it fails); a master is declared failed after ``node_timeout`` ms (1 s with
    replicas, 15 s without, unless given)."""

    def __init__(self, tmp: Path, masters: int = 3, *, replicas: int = 0, node_timeout: int | None = None) -> None:
        if node_timeout is None:
            node_timeout = 1000 if replicas else 15000
        self.nodes = []
        for i in range(masters * (1 + replicas)):
            d = tmp / f"node{i}"
            d.mkdir()
            self.nodes.append(
                start_redis(
                    d,
                    cluster_port(),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(d / "nodes.conf"),
                    "--cluster-require-full-coverage",
                    "no",
                    "--cluster-node-timeout",
                    str(node_timeout),
                )
            )
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for node in self.nodes:
            wait_for(lambda n=node: "cluster_state:ok" in self.cli(n.port, "CLUSTER", "INFO"), what="cluster state ok")
        self.url = "redis+cluster://" + ",".join(addresses)

    @staticmethod
    def cli(port: int, *args: str) -> str:
        return subprocess.run([REDIS_CLI, "-p", str(port), *args], capture_output=True, text=True, timeout=10).stdout

    def owner(self, key: str, via: int | None = None) -> int:
        """The port of the master that holds ``key``'s slot (as node ``via`` sees it)."""
        via = via or self.nodes[0].port
        slot = int(self.cli(via, "CLUSTER", "KEYSLOT", key))
        for line in self.cli(via, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(key)

    def table(self) -> list[dict]:
        """CLUSTER NODES as seen by the first live node: id, port, role, master id, slots."""
        live = next(n for n in self.nodes if n.proc.poll() is None)
        rows = []
        for line in self.cli(live.port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            rows.append(
                {
                    "id": fields[0],
                    "port": port,
                    "node": port,
                    "master": "master" in fields[2] and "fail" not in fields[2],
                    "of": fields[3],
                    "slots": fields[8:],
                }
            )
        return rows

    def node(self, port: int):  # type: ignore[no-untyped-def]
        return next(n for n in self.nodes if n.port == port)

    def migrate(self, slot: int, source: int, target: int, *, between: Callable[[], None] = lambda: None) -> None:
        """Move ``slot`` and its keys from the master at port ``source`` to ``target``."""
        migrate_slot(self.cli, self.table(), slot, source, target, ("127.0.0.1", target), between=between)

    def stop(self) -> None:
        for node in self.nodes:
            stop(node.proc, signal.SIGTERM)


def migrate_slot(
    cli: Callable[..., str],
    table: list[dict],
    slot: int,
    source: Any,
    destination: Any,
    to: tuple[str, int],
    *,
    between: Callable[[], None] = lambda: None,
) -> None:
    """Move ``slot`` and its keys from master ``source`` to master ``destination``
    (reached at ``to``, host and port) the way ``redis-cli --cluster reshard`` does.

    ``cli(node, *args)`` runs redis-cli against a node as ``table`` names it (rows
    with "node", "id" and "master"); ``between`` runs once the slot is migrating,
    its keys still on the source.
    """
    ids = {row["node"]: row["id"] for row in table}

    def ok(node: Any, *args: Any) -> None:
        out = cli(node, *map(str, args)).strip()
        if out != "OK":
            raise RuntimeError(f"{' '.join(map(str, args[:3]))} on {node}: {out!r}")

    ok(destination, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
    ok(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[destination])
    between()
    while keys := cli(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "100").split():
        ok(source, "MIGRATE", to[0], to[1], "", 0, 5000, "KEYS", *keys)
    for node in (destination, source):
        ok(node, "CLUSTER", "SETSLOT", slot, "NODE", ids[destination])
    for row in table:
        if row["master"] and row["node"] not in (source, destination):
            ok(row["node"], "CLUSTER", "SETSLOT", slot, "NODE", ids[destination])


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


@pytest.fixture
def publish_command() -> str:
    return "PUBLISH"


@pytest.fixture
def on_cluster(cluster, project, tmp_path, monkeypatch, publish_command):
    """An offload stack, and this process's publish(), on the cluster."""
    import django_ws.conf

    monkeypatch.setenv("DJANGO_WS_REDIS_URL", cluster.url)
    monkeypatch.setenv("DJANGO_WS_PUBLISH_COMMAND", publish_command)
    monkeypatch.setattr(django_ws.conf, "_cached", None)  # re-read; the old settings come back after
    stack = start_stack(
        "offload", project, tmp_path, DJANGO_WS_REDIS_URL=cluster.url, DJANGO_WS_PUBLISH_COMMAND=publish_command
    )
    yield stack
    for proc in stack.procs:
        stop(proc)


def _channel(facility: str, audience) -> str:
    from django_ws.conf import get_settings
    from uwsgi_ws.protocol import channel_name

    return channel_name(get_settings().prefix, facility, audience)


@pytest.mark.parametrize("publish_command", ["PUBLISH", "SPUBLISH"])
def test_every_audience_history_and_recovery_on_a_cluster(cluster, on_cluster, project, facility, publish_command):
    from uwsgi_ws.protocol import Audience, Kind

    stack = on_cluster
    # A facility whose channels sit on different masters: one subscriber connection
    # (on one node) then hears messages published on other nodes.
    audiences = (Audience(Kind.BROADCAST), Audience(Kind.USER, "alice"), Audience(Kind.GROUP, "red"))
    facility = next(
        name
        for name in (f"{facility}{i}" for i in range(100))
        if len({cluster.owner(_channel(name, a)) for a in audiences}) > 1
    )
    alice = project.cookie("alice")
    ws = WS(stack.url(f"/ws/{facility}?subscribe-broadcast&subscribe-user&subscribe-group"), session=alice)
    ws.ready()
    # The channels' slots are spread over the masters, and one subscriber connection hears them all.
    django_ws.publish(facility, "to all", broadcast=True)
    django_ws.publish(facility, "to alice", users=["alice"])
    django_ws.publish(facility, "to red", groups=["red"])
    got = [ws.next() for _ in range(3)]
    if publish_command == "SPUBLISH":
        # Sharded: the worker listens on each master owning one of the channels (its
        # socket's, and the control channel carrying disconnect orders), and no other.
        from django_ws.conf import get_settings
        from uwsgi_ws.protocol import control_channel

        owners = {cluster.owner(control_channel(get_settings().prefix))}
        owners |= {cluster.owner(_channel(facility, a)) for a in audiences}
        hubs = {n.port for n in cluster.nodes if "django_ws:hub:" in cluster.cli(n.port, "CLIENT", "LIST")}
        assert hubs == owners
    # Order holds within a channel; across channels on different masters it depends on
    # the cluster bus, which forwards each master's publications to the Hub's node.
    assert sorted((m["channel"], m["data"]) for m in got) == [
        ("broadcast", "to all"),
        ("group:red", "to red"),
        ("user", "to alice"),
    ]
    positions = {m["channel"]: [m["offset"], m["epoch"]] for m in got}
    ws.close()

    # Missed while away: recovered from the history each channel keeps on its own master.
    django_ws.publish(facility, "missed 1", broadcast=True)
    django_ws.publish(facility, "missed 2", users=["alice"])
    recover = "recover=" + urllib.parse.quote(json.dumps(positions))
    again = WS(stack.url(f"/ws/{facility}?subscribe-broadcast&subscribe-user&subscribe-group&{recover}"), session=alice)
    frames = again.ready()
    replayed = [(f["channel"], f["data"]) for f in frames if f["type"] == "message"]
    assert sorted(replayed) == [("broadcast", "missed 1"), ("user", "missed 2")]
    assert all(f["recovered"] is True for f in frames if f["type"] == "subscribed")
    again.close()


def test_the_hub_moves_to_another_master_when_its_own_fails(cluster, on_cluster, facility):
    from uwsgi_ws.protocol import Audience, Kind

    stack = on_cluster
    first = WS(stack.url(f"/ws/{facility}?subscribe-broadcast"))
    first.ready()  # the worker's Hub is connected now
    # The master holding the Hub's subscriber connection (client name django_ws:hub:<pid>).
    hub_node = next(n for n in cluster.nodes if "django_ws:hub:" in cluster.cli(n.port, "CLIENT", "LIST"))
    # A facility whose channel lives on another master, which stays up.
    name = next(
        f"{facility}{i}"
        for i in range(100)
        if cluster.owner(_channel(f"{facility}{i}", Audience(Kind.BROADCAST))) != hub_node.port
    )
    # Up to 30 s per frame: the Hub must notice its node is gone and move (slower
    # on a loaded machine).
    ws = WS(stack.url(f"/ws/{name}?subscribe-broadcast"), timeout=30)
    ws.ready()
    stop(hub_node.proc, signal.SIGKILL)  # a node this test started
    django_ws.publish(name, "after the node died", broadcast=True)
    # Live if the Hub was back in time, else replayed from history when it re-subscribed
    # (then a "subscribed" frame with recovered: true follows).
    assert next_message(ws)["data"] == "after the node died"
    survivors = [n for n in cluster.nodes if n is not hub_node]
    wait_for(lambda: any("django_ws:hub:" in cluster.cli(n.port, "CLIENT", "LIST") for n in survivors), what="Hub")
    django_ws.publish(name, "live again", broadcast=True)
    assert next_message(ws)["data"] == "live again"
    ws.close()
    first.close()


def test_a_small_pool_makes_callers_wait_on_a_cluster_too(cluster):
    # Right after a failover every connection of a worker needs Redis at once: with
    # the pool's bound reached, callers wait for a connection instead of failing.
    from tests.conftest import many_waiting_for_a_small_pool
    from uwsgi_ws.redis_url import make_client

    client = make_client(cluster.url, max_connections=2, wait=10, socket_timeout=5)
    assert many_waiting_for_a_small_pool(client) == []
    client.close()


def test_one_hub_per_worker_when_its_first_connections_arrive_at_once(cluster):
    # Making the Redis client of a Cluster URL talks to the nodes (it reads the slot
    # map): connections arriving together at a fresh worker must still share one
    # Hub and one Store, not each start their own subscriber connection.
    import secrets
    import threading

    from uwsgi_ws.app import WebSocketApplication

    app = WebSocketApplication(Config(secret=secrets.token_bytes(32), redis_url=cluster.url))
    start = threading.Barrier(8)
    got: list = []

    def first_connection() -> None:
        start.wait(10)
        got.append(app._runtime())

    threads = [threading.Thread(target=first_connection) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    hubs = {id(hub): hub for hub, _ in got}
    stores = {id(store): store for _, store in got}
    for hub in hubs.values():
        hub.stop()
    app.close()
    assert (len(got), len(hubs), len(stores)) == (8, 1, 1)
