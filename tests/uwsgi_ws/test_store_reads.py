"""Store.fetch against a real Redis: concurrent reads of one channel are merged, and
a channel that restarted (Redis lost it) still hands over its new history."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from tests.conftest import start_redis, stop
from uwsgi_ws.exceptions import RedisUnavailable
from uwsgi_ws.protocol import KIND_TEXT, Position
from uwsgi_ws.store import Store


@pytest.fixture
def private(tmp_path):
    server = start_redis(tmp_path)
    yield server
    stop(server.proc)


def hmget_calls(client: redis.Redis) -> int:
    # The read script's one HMGET per channel read (INFO commandstats counts a
    # script's inner calls).
    return int(client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


def publish(store: Store, channel: str, text: str) -> int:
    [published] = store.publish([channel], KIND_TEXT, text.encode(), history_size=100, history_ttl=60)
    return published.offset


class Watched(redis.Redis):
    """A client that tells when a pipeline is first sent."""

    sent = threading.Event()

    def pipeline(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        type(self).sent.set()
        return super().pipeline(*args, **kwargs)


def test_reads_waiting_behind_one_in_flight_are_sent_together_once(private):
    client = private.client()
    store = Store(Watched(port=private.port, max_connections=100))
    channel = "{t:" + uuid.uuid4().hex + ":broadcast}"
    own = ["{t:" + uuid.uuid4().hex + ":user:u" + str(i) + "}" for i in range(50)]
    first = publish(store, channel, "m1")
    publish(store, channel, "m2")
    [state] = store.fetch([(channel, None, False)])
    since = Position(first, state.epoch or "")
    client.config_resetstat()
    # Redis holds every command for a second: the first read is on its way meanwhile,
    # and the 50 callers that come after it wait for it, as 5,000 sockets coming back
    # from a restart at once do.
    client.client_pause(1000)
    results: list[list] = [[] for _ in range(51)]
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            requests = [(channel, since, False)] + ([(own[i - 1], None, False)] if i else [])
            results[i] = store.fetch(requests)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    leader = threading.Thread(target=read, args=(0,))
    Watched.sent.clear()
    leader.start()
    assert Watched.sent.wait(5), "the first read was not sent"
    others = [threading.Thread(target=read, args=(i,)) for i in range(1, 51)]
    for thread in others:
        thread.start()
    for thread in [leader, *others]:
        thread.join(20)
    assert errors == []
    # The first read, then the 50 waiting ones together: the shared channel read once
    # more, each caller's own channel once.
    assert hmget_calls(client) == 1 + 1 + 50
    for i, states in enumerate(results):
        assert [e.payload for e in states[0].history] == [b"m2"], i
        assert len(states) == (2 if i else 1)


def test_a_failed_read_fails_every_caller_waiting_for_it(private):
    store = Store(redis.Redis(port=private.port))
    channel = "{t:" + uuid.uuid4().hex + ":broadcast}"
    store.client = redis.Redis(port=1, socket_connect_timeout=0.2)
    with pytest.raises(RedisUnavailable):
        store.fetch([(channel, Position(1, "e"), False)])
    store.client = redis.Redis(port=private.port)
    assert store.fetch([(channel, None, False)])[0].epoch is None  # the next call reads again


def test_a_channel_redis_lost_hands_over_its_new_epoch(private):
    from uwsgi_ws.protocol import decide_recovery

    client = private.client()
    store = Store(redis.Redis(port=private.port))
    channel = "{t:" + uuid.uuid4().hex + ":broadcast}"
    seen = publish(store, channel, "old")
    [old] = store.fetch([(channel, None, False)])
    client.flushall()  # Redis lost everything, as after a restart without its data
    for i in range(3):
        publish(store, channel, f"new {i}")
    [state] = store.fetch([(channel, Position(seen, old.epoch or ""), False)])
    assert state.epoch != old.epoch and state.top == 3
    outcome = decide_recovery(Position(seen, old.epoch or ""), state.epoch, state.top, state.history)
    assert outcome.recovered is False
    assert [e.payload for e in outcome.envelopes] == [b"new 0", b"new 1", b"new 2"]
