"""The controller closes this worker's connections on Django's orders (a real Redis, a
real Hub in threads)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis
from redis.connection import Connection

from tests.conftest import wait_for
from uwsgi_ws.control import Controller
from uwsgi_ws.hub import Hub
from uwsgi_ws.protocol import KIND_JSON, KIND_TEXT, Disconnect, encode_disconnect
from uwsgi_ws.store import Store


class Peer:
    """A connection as the controller sees it."""

    def __init__(self, *tags: str, started: float | None = None) -> None:
        self.tags = tags
        self.started = time.time() - 1 if started is None else started
        self.closed: tuple[int, str] | None = None
        self.event = threading.Event()

    def close_soon(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.event.set()


@pytest.fixture
def setup(redis_server):
    """A Hub whose reconnections wait for ``gate``, its Store and a Controller."""
    name = f"test-control-{uuid.uuid4().hex[:8]}"
    gate = threading.Event()
    gate.set()
    attempts = []

    def connect() -> Connection:
        attempts.append(time.monotonic())
        if len(attempts) > 1:
            gate.wait(20)
        return Connection(port=redis_server.port, client_name=name, socket_timeout=30)

    store = Store(redis.Redis(port=redis_server.port))
    hub = Hub(connect, store=store, ping_interval=10)
    controller = Controller("c" + uuid.uuid4().hex[:8], hub, store)
    yield hub, store, controller, gate, attempts, name
    gate.set()
    hub.stop()
    store.client.close()


def give(store: Store, controller: Controller, order: Disconnect) -> int:
    [published] = store.publish(
        [controller.channel], KIND_JSON, encode_disconnect(order), history_size=100, history_ttl=60
    )
    return published.receivers


def test_an_order_closes_the_connections_with_its_tags_only(setup):
    hub, store, controller, *_ = setup
    bob, bobs_tab, carol = Peer("user:bob", "session:1"), Peer("user:bob", "session:2"), Peer("user:carol")
    for peer in (bob, bobs_tab, carol):
        controller.add(peer, timeout=5)
    assert give(store, controller, Disconnect(("user:bob",), 4100, "bye", time.time())) == 1
    assert bob.event.wait(5) and bobs_tab.event.wait(5)
    assert bob.closed == bobs_tab.closed == (4100, "bye")
    assert carol.closed is None
    controller.remove(bob)
    controller.remove(bobs_tab)
    assert controller.connections == 1


def test_a_connection_made_after_the_order_is_not_its_target(setup):
    hub, store, controller, *_ = setup
    late = Peer("user:dave", started=time.time())
    controller.add(late, timeout=5)
    # An order given a minute before the connection started (as seen on a replay).
    give(store, controller, Disconnect(("user:dave",), 4100, "", time.time() - 60))
    marker = Peer("user:erin")
    controller.add(marker, timeout=5)
    give(store, controller, Disconnect(("user:erin",), 4100, "", time.time()))
    assert marker.event.wait(5)  # the orders arrive in turn: the first one was seen
    assert late.closed is None


def test_malformed_orders_are_ignored(setup, caplog):
    hub, store, controller, *_ = setup
    peer = Peer("user:frank")
    controller.add(peer, timeout=5)
    store.publish([controller.channel], KIND_TEXT, b"not json", history_size=10, history_ttl=60)
    give(store, controller, Disconnect(("user:frank",), 4100, "", time.time()))
    assert peer.event.wait(5)
    assert "malformed control message" in caplog.text


def test_orders_given_while_the_hub_was_disconnected_are_carried_out(setup, redis_server):
    hub, store, controller, gate, attempts, name = setup
    peer = Peer("session:abc")
    controller.add(peer, timeout=5)
    gate.clear()  # the Hub's next connection waits
    client = redis_server.client()
    [hub_conn] = [c for c in client.client_list() if c.get("name") == name]
    client.client_kill_filter(_id=hub_conn["id"])
    wait_for(lambda: len(attempts) >= 2, what="the Hub trying to reconnect")
    # Nobody listens now: the order can only be found in the channel's history.
    assert give(store, controller, Disconnect(("session:abc",), 4100, "session ended", time.time())) == 0
    assert peer.closed is None
    gate.set()
    assert peer.event.wait(10), "the missed order was not carried out after the reconnection"
    assert peer.closed == (4100, "session ended")
