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


def test_a_history_read_that_fails_is_reported_to_the_listeners(hub_setup, private_redis, monkeypatch):
    import uwsgi_ws.hub

    monkeypatch.setattr(uwsgi_ws.hub, "_RESYNC_PAUSES", (0.2, 0.5))
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


def test_after_redis_lost_a_channel_its_new_messages_are_delivered(hub_setup):
    # Redis restarted empty while the Hub was away: what was published since, in the
    # channel's new epoch, reaches the listeners; the old gap is reported lost.
    hub, store, gate, client = hub_setup
    listener = Listener()
    hub.subscribe(listener, [channel("g")], timeout=5)
    publish(store, channel("g"), "before")
    wait_for(lambda: listener.messages, what="the first message")
    gate.reconnect.clear()
    gate.kill(client)
    wait_for(lambda: gate.connects >= 2, what="the Hub trying to reconnect")
    client.flushall()
    for i in range(3):
        publish(store, channel("g"), f"new {i}")
    gate.reconnect.set()
    wait_for(lambda: listener.resyncs, what="the resync")
    [(_, recovered, position)] = listener.resyncs
    assert recovered is False and position == Position(3, _epoch(store, channel("g")))
    assert [m[2] for m in listener.messages] == [b"before", b"new 0", b"new 1", b"new 2"]


def _hmget_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


def test_a_recent_position_is_recovered_from_the_hub_without_redis(hub_setup):
    hub, store, gate, client = hub_setup
    listeners = [Listener(), Listener()]
    for listener in listeners:
        hub.subscribe(listener, [channel("h")], timeout=5)
    for i in range(3):
        publish(store, channel("h"), f"m{i}")
    wait_for(lambda: all(len(x.messages) == 3 for x in listeners), what="the messages")
    epoch = _epoch(store, channel("h"))
    client.config_resetstat()
    state = hub.recent(channel("h"), Position(1, epoch))
    assert state is not None and (state.epoch, state.top) == (epoch, 3)
    assert [e.payload for e in state.history] == [b"m1", b"m2"]
    caught_up = hub.recent(channel("h"), Position(3, epoch))
    assert caught_up is not None and (caught_up.top, caught_up.history) == (3, ())
    assert _hmget_calls(client) == 0
    # What the Hub cannot know (another epoch) it reads, as the caller would have.
    other = Position(1, "another")
    assert hub.recent(channel("h"), other) == store.fetch([(channel("h"), other, False)])[0]
    assert _hmget_calls(client) == 2
    assert hub.recent(channel("h"), Position(0, "")) is None  # from the start: the caller reads


def test_what_the_hub_cannot_answer_is_read_once_for_all_the_callers(hub_setup):
    # A worker that just started: its Hub delivered nothing yet, and connections come
    # back from a position some messages ago, all at once.
    hub, store, gate, client = hub_setup
    for i in range(4):
        publish(store, channel("k"), f"m{i}")
    epoch = _epoch(store, channel("k"))
    listeners = [Listener() for _ in range(20)]
    for listener in listeners:
        hub.subscribe(listener, [channel("k")], timeout=5)
    client.config_resetstat()
    answers: list = []
    start = threading.Barrier(20)

    def come_back() -> None:
        start.wait(5)
        answers.append(hub.recent(channel("k"), Position(2, epoch)))

    threads = [threading.Thread(target=come_back) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(answers) == 20
    for answer in answers:
        assert answer is not None and answer.top == 4
        assert [e.payload for e in answer.history] == [b"m2", b"m3"]
    assert _hmget_calls(client) == 1
    # Live messages still reach every listener once.
    publish(store, channel("k"), "live")
    wait_for(lambda: all(x.messages == [(channel("k"), 5, b"live")] for x in listeners), what="the live message")


def test_a_channel_that_went_back_after_a_lossy_failover_delivers_its_new_messages(hub_setup):
    # A replica promoted before it had the last messages: the channel stands at an
    # offset below what the Hub delivered, in the same epoch, and the next messages
    # reuse those offsets. They must reach the listeners, not be taken for repeats.
    from uwsgi_ws.protocol import log_key, meta_key

    hub, store, gate, client = hub_setup
    listener = Listener()
    hub.subscribe(listener, [channel("l")], timeout=5)
    for i in range(5):
        publish(store, channel("l"), f"m{i}")
    wait_for(lambda: len(listener.messages) == 5, what="the messages")
    gate.reconnect.clear()
    gate.kill(client)
    wait_for(lambda: gate.connects >= 2, what="the Hub trying to reconnect")
    # What the promoted replica had: the first three messages.
    kept = client.xrange(log_key(channel("l")), "-", "3-0")
    client.delete(log_key(channel("l")))
    for entry_id, fields in kept:
        client.xadd(log_key(channel("l")), fields, id=entry_id)
    client.hset(meta_key(channel("l")), "offset", 3)
    gate.reconnect.set()
    wait_for(lambda: listener.resyncs, what="the resync")
    epoch = _epoch(store, channel("l"))
    assert listener.resyncs == [(channel("l"), False, Position(3, epoch))]
    listener.where = Position(3, epoch)  # as a session does on resynced
    assert publish(store, channel("l"), "new 4") == 4
    wait_for(lambda: len(listener.messages) == 6, what="the new message at offset 4", timeout=5)
    assert listener.messages[-1] == (channel("l"), 4, b"new 4")


def test_a_history_read_failing_for_seconds_is_retried_until_it_works(hub_setup, private_redis):
    # As during a Cluster failover: the channel's master is gone for a few seconds,
    # then its replica answers. The listeners are recovered, not closed.
    hub, store, gate, client = hub_setup
    listener = Listener()
    hub.subscribe(listener, [channel("m")], timeout=5)
    publish(store, channel("m"), "before")
    wait_for(lambda: listener.messages, what="the first message")
    gate.reconnect.clear()
    gate.kill(client)
    wait_for(lambda: gate.connects >= 2, what="the Hub trying to reconnect")
    publish(store, channel("m"), "missed")
    reachable = store.client
    store.client = redis.Redis(port=1, socket_connect_timeout=0.2)  # the reads fail
    gate.reconnect.set()
    # Longer than the reads used to be tried (1.7 s), then the replica answers.
    wait_for(lambda: hub.resync_reads >= 5, what="five failed reads", timeout=10)
    store.client = reachable  # the replica took over
    wait_for(lambda: listener.resyncs, what="the resync", timeout=20)
    assert listener.failed == []
    assert [r[1] for r in listener.resyncs] == [True]
    assert [m[2] for m in listener.messages] == [b"before", b"missed"]
