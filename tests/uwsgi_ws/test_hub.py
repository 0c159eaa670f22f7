"""The Hub against a real Redis, in threads, with its connection killed for faults."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis
from redis.connection import Connection

from tests.conftest import start_redis, stop, wait_for
from uwsgi_ws.exceptions import SubscribeTimeout
from uwsgi_ws.hub import Hub
from uwsgi_ws.protocol import KIND_TEXT, Envelope, Position
from uwsgi_ws.store import Store


class Listener:
    """Records what the Hub gives it."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.messages: list[tuple[str, int, bytes]] = []
        self.resyncs: list[tuple[str, bool, Position]] = []
        self.failed: list[str] = []
        self.where: Position | None = None

    def deliver(self, channel: str, envelope: Envelope, frame: bytes) -> None:
        if self.fail:
            raise RuntimeError("a broken listener")
        self.messages.append((channel, envelope.offset, envelope.payload))
        self.where = Position(envelope.offset, envelope.epoch)

    def resynced(self, channel: str, recovered: bool, position: Position) -> None:
        self.resyncs.append((channel, recovered, position))

    def resync_failed(self, channel: str) -> None:
        self.failed.append(channel)

    def position(self, channel: str) -> Position | None:
        return self.where


class Gate:
    """A subscriber connection factory whose reconnections (and first SUBSCRIBE after
    them) the test opens and closes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.name = f"test-hub-{uuid.uuid4().hex[:8]}"
        self.connects = 0
        self.reconnect = threading.Event()  # let a reconnection through
        self.reconnect.set()
        self.subscribing = threading.Event()  # set when a reconnection's SUBSCRIBE is being sent
        self.hold_subscribe = False
        self.release_subscribe = threading.Event()

    def __call__(self) -> Connection:
        self.connects += 1
        if self.connects > 1:
            self.reconnect.wait(20)
        gate = self
        first_send = [self.connects > 1]

        class GatedConnection(Connection):
            def send_command(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                if first_send[0] and args and args[0] == "SUBSCRIBE":
                    first_send[0] = False
                    gate.subscribing.set()
                    if gate.hold_subscribe:
                        gate.release_subscribe.wait(20)
                return super().send_command(*args, **kwargs)

        return GatedConnection(port=self.port, client_name=self.name, socket_timeout=30)

    def kill(self, client: redis.Redis) -> None:
        [conn] = [c for c in client.client_list() if c.get("name") == self.name]
        client.client_kill_filter(_id=conn["id"])


@pytest.fixture
def private_redis(tmp_path):
    server = start_redis(tmp_path)
    yield server
    stop(server.proc)


@pytest.fixture
def hub_setup(private_redis):
    gate = Gate(private_redis.port)
    store = Store(redis.Redis(port=private_redis.port))
    hub = Hub(gate, store=store, ping_interval=10)
    yield hub, store, gate, private_redis.client()
    gate.reconnect.set()
    gate.release_subscribe.set()
    hub.stop()
    store.client.close()


def publish(store: Store, channel: str, text: str, history: int = 100) -> int:
    [published] = store.publish([channel], KIND_TEXT, text.encode(), history_size=history, history_ttl=60)
    return published.offset


def channel(name: str) -> str:
    return "{t:" + name + ":broadcast}"


def test_many_listeners_share_one_connection_and_one_subscription(hub_setup):
    hub, store, gate, client = hub_setup
    listeners = [Listener() for _ in range(50)]
    for listener in listeners:
        hub.subscribe(listener, [channel("a")], timeout=5)
    assert sum(1 for c in client.client_list() if c.get("name") == gate.name) == 1
    assert client.pubsub_numsub(channel("a")) == [(channel("a").encode(), 1)]
    publish(store, channel("a"), "hello")
    wait_for(lambda: all(listener.messages for listener in listeners), what="every listener served")
    for listener in listeners[:-1]:
        hub.unsubscribe(listener, [channel("a")])
    assert client.pubsub_numsub(channel("a"))[0][1] == 1  # one listener left
    hub.unsubscribe(listeners[-1], [channel("a")])
    wait_for(lambda: client.pubsub_numsub(channel("a"))[0][1] == 0, what="UNSUBSCRIBE")


def test_a_subscription_made_while_reconnecting_is_not_lost(hub_setup):
    # The reader takes its snapshot of the channels and sends SUBSCRIBE for them; a
    # subscribe() in between must still reach Redis (once the reader is done).
    hub, store, gate, client = hub_setup
    hub.subscribe(Listener(), [channel("old")], timeout=5)
    gate.hold_subscribe = True
    gate.kill(client)
    assert gate.subscribing.wait(10), "the Hub did not reconnect"
    late = Listener()
    done = threading.Event()
    errors = []

    def subscribe_late() -> None:
        try:
            hub.subscribe(late, [channel("new")], timeout=10)
        except SubscribeTimeout as exc:
            errors.append(exc)
        done.set()

    threading.Thread(target=subscribe_late, daemon=True).start()
    wait_for(lambda: hub.channel_count == 2, what="the late subscribe() registered")
    gate.release_subscribe.set()
    assert done.wait(15)
    assert errors == [], "the channel subscribed during the reconnection was never subscribed"
    publish(store, channel("new"), "reached")
    wait_for(lambda: late.messages, what="the late listener's message")


def test_a_listener_that_raises_does_not_cost_the_connection(hub_setup):
    hub, store, gate, client = hub_setup
    broken, fine = Listener(fail=True), Listener()
    hub.subscribe(broken, [channel("b")], timeout=5)
    hub.subscribe(fine, [channel("b")], timeout=5)
    [before] = [c["id"] for c in client.client_list() if c.get("name") == gate.name]
    for i in range(3):
        publish(store, channel("b"), f"m{i}")
    wait_for(lambda: len(fine.messages) == 3, what="the other listener's messages")
    assert hub.listener_errors == 3 and hub.reconnects == 0
    assert [c["id"] for c in client.client_list() if c.get("name") == gate.name] == [before]


def test_after_a_reconnection_each_channel_is_read_once_for_all_its_listeners(hub_setup, private_redis):
    hub, store, gate, client = hub_setup
    listeners = [Listener() for _ in range(500)]
    for listener in listeners:
        hub.subscribe(listener, [channel("c")], timeout=5)
    publish(store, channel("c"), "before")
    wait_for(lambda: all(len(x.messages) == 1 for x in listeners), what="the first message")
    gate.reconnect.clear()
    gate.kill(client)
    wait_for(lambda: gate.connects >= 2, what="the Hub trying to reconnect")
    missed = [publish(store, channel("c"), f"missed {i}") for i in range(3)]
    client.config_resetstat()
    gate.reconnect.set()
    wait_for(lambda: all(x.resyncs for x in listeners), what="every listener resynchronised")
    publish(store, channel("c"), "after")
    wait_for(lambda: all(len(x.messages) == 5 for x in listeners), what="the live message after")
    stats = client.info("commandstats")
    epoch = _epoch(store, channel("c"))
    for listener in listeners:
        assert [m[2] for m in listener.messages] == [b"before", b"missed 0", b"missed 1", b"missed 2", b"after"]
        assert listener.resyncs == [(channel("c"), True, Position(missed[-1], epoch))]
    # One history read for the channel (the read script's HMGET and XRANGE run once),
    # whatever the number of listeners; _epoch's read came after the count.
    calls = {k: v["calls"] for k, v in stats.items()}
    assert (calls.get("cmdstat_hmget"), calls.get("cmdstat_xrange")) == (1, 1), calls
    assert hub.resync_reads == 1


def _epoch(store: Store, name: str) -> str:
    [state] = store.fetch([(name, None, False)])
    assert state.epoch is not None
    return state.epoch


def test_a_gap_the_history_cannot_cover_is_reported(hub_setup):
    hub, store, gate, client = hub_setup
    listener = Listener()
    hub.subscribe(listener, [channel("d")], timeout=5)
    publish(store, channel("d"), "before", history=2)
    wait_for(lambda: listener.messages, what="the first message")
    gate.reconnect.clear()
    gate.kill(client)
    wait_for(lambda: gate.connects >= 2, what="the Hub trying to reconnect")
    for i in range(5):
        top = publish(store, channel("d"), f"missed {i}", history=2)  # only 2 kept
    gate.reconnect.set()
    wait_for(lambda: listener.resyncs, what="the resync")
    [(_, recovered, position)] = listener.resyncs
    assert recovered is False and position.offset == top
    assert [m[2] for m in listener.messages] == [b"before"]  # nothing delivered out of a gap


def test_a_history_read_that_fails_is_reported_to_the_listeners(hub_setup, private_redis):
    hub, store, gate, client = hub_setup
    listener = Listener()
    hub.subscribe(listener, [channel("e")], timeout=5)
    publish(store, channel("e"), "before")
    wait_for(lambda: listener.messages, what="the first message")
    gate.reconnect.clear()
    gate.kill(client)
    wait_for(lambda: gate.connects >= 2, what="the Hub trying to reconnect")
    store.client = redis.Redis(port=1, socket_connect_timeout=0.2)  # the reads now fail
    gate.reconnect.set()
    wait_for(lambda: listener.failed, what="resync_failed", timeout=15)
    assert listener.failed == [channel("e")]


def test_an_unexpected_error_in_a_history_read_does_not_hold_the_channel_forever(hub_setup, monkeypatch):
    # A client library bug (redis-py's cluster pipeline raising AttributeError while a
    # slot moves, for one) must not leave the channel's live messages held.
    hub, store, gate, client = hub_setup
    listener = Listener()
    hub.subscribe(listener, [channel("u")], timeout=5)
    publish(store, channel("u"), "before")
    wait_for(lambda: listener.messages, what="the first message")

    def broken(requests):  # type: ignore[no-untyped-def]
        raise AttributeError("'NoneType' object has no attribute 'redis_connection'")

    monkeypatch.setattr(store, "fetch", broken)
    gate.kill(client)
    wait_for(lambda: listener.failed, what="resync_failed", timeout=15)
    assert listener.failed == [channel("u")]
    monkeypatch.undo()
    publish(store, channel("u"), "live")
    wait_for(lambda: len(listener.messages) == 2, what="the live message")
    assert [payload for _, _, payload in listener.messages] == [b"before", b"live"]


def test_subscribe_times_out_when_redis_does_not_answer(private_redis, tmp_path):
    gate = Gate(private_redis.port)
    hub = Hub(gate, ping_interval=10)
    private_redis.client().client_pause(3000)
    started = time.monotonic()
    with pytest.raises(SubscribeTimeout):
        hub.subscribe(Listener(), [channel("f")], timeout=0.5)
    assert time.monotonic() - started < 2.5
    hub.stop()
