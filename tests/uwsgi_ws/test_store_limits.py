"""Store.allow (the per-client rate limit) and the history byte cap, on a real Redis."""

from __future__ import annotations

import math
import uuid

import pytest
import redis

from tests.conftest import free_port, wait_for
from uwsgi_ws.exceptions import PublishError
from uwsgi_ws.protocol import KIND_TEXT, Audience, Kind, channel_name, decode_envelope, log_key, meta_key, rate_key
from uwsgi_ws.store import Store


@pytest.fixture
def store(redis_server):
    return Store(redis_server.client())


@pytest.fixture
def key():
    return rate_key("ws", f"user:{uuid.uuid4().hex}")


@pytest.fixture
def channel():
    return channel_name("ws", "t" + uuid.uuid4().hex[:12], Audience(Kind.BROADCAST))


def test_rate_key_is_its_own_hash_tag():
    assert rate_key("ws", "user:42") == "{ws:rate:user:42}"
    assert rate_key("ws", "addr:::1") == "{ws:rate:addr:::1}"
    assert rate_key("ws", "user:{a}") == "{ws:rate:user:%7Ba%7D}"  # braces cannot end the tag


def test_a_burst_then_refusals_with_the_wait(store, key):
    assert [bool(store.allow(key, rate=0.01, burst=3)) for _ in range(5)] == [True, True, True, False, False]
    refused = store.allow(key, rate=0.01, burst=3)
    assert not refused.allowed
    # One token takes 100 s at 0.01 per second; a little of it has passed already.
    assert 99 < refused.retry_after <= 100


def test_tokens_come_back_at_the_rate(store, key):
    assert store.allow(key, rate=20, burst=1)
    assert not store.allow(key, rate=20, burst=1)
    wait_for(lambda: store.allow(key, rate=20, burst=1), timeout=5, what="a token after 50 ms")


def test_an_idle_bucket_expires(store, key, redis_server):
    store.allow(key, rate=0.5, burst=2)
    ttl = redis_server.client().pttl(key)
    # Refilled (2 - 1) / 0.5 s after, then gone: an absent bucket is a full one.
    assert 0 < ttl <= math.ceil(1 / 0.5 * 1000) + 1000


def test_no_limit_touches_no_redis(store, key, redis_server):
    assert all(store.allow(key, rate=0, burst=0) for _ in range(100))
    assert not redis_server.client().exists(key)


def test_a_burst_below_one_is_a_mistake(store, key):
    with pytest.raises(ValueError, match="burst"):
        store.allow(key, rate=1, burst=0)


def test_redis_down_is_a_publish_error(key):
    down = Store(redis.Redis(port=free_port(), socket_connect_timeout=1))
    with pytest.raises(PublishError, match="rate"):
        down.allow(key, rate=1, burst=1)


def test_the_bucket_is_shared_by_every_store(redis_server, key):
    """Two clients stand for two processes: one bucket, in Redis."""
    first, second = Store(redis_server.client()), Store(redis_server.client())
    answers = [bool((first if i % 2 else second).allow(key, rate=0.01, burst=4)) for i in range(8)]
    assert answers == [True] * 4 + [False] * 4


# --------------------------------------------------------------------------- history bytes


def _kept(redis_server, channel: str) -> list[bytes]:
    return [fields[b"e"] for _, fields in redis_server.client().xrange(log_key(channel))]


def _publish(store: Store, channel: str, payload: bytes, **kwargs) -> int:
    options = {"history_size": 100, "history_ttl": 60, "history_max_bytes": 10_000, **kwargs}
    return store.publish([channel], KIND_TEXT, payload, **options)[0].offset


def test_the_oldest_entries_go_until_the_bytes_fit(store, channel, redis_server):
    for i in range(30):
        _publish(store, channel, b"%02d" % i + b"x" * 998)
    kept = _kept(redis_server, channel)
    assert sum(len(e) for e in kept) <= 10_000
    offsets = [decode_envelope(e).offset for e in kept]
    assert offsets == list(range(31 - len(offsets), 31)) and len(offsets) == 9  # the newest, contiguous
    counted = int(redis_server.client().hget(meta_key(channel), "bytes"))
    assert counted == sum(len(e) for e in kept)


def test_the_count_still_applies(store, channel, redis_server):
    for i in range(10):
        _publish(store, channel, b"small %d" % i, history_size=3)
    assert [decode_envelope(e).payload for e in _kept(redis_server, channel)] == [b"small 7", b"small 8", b"small 9"]


def test_a_message_larger_than_the_cap_leaves_no_history(store, channel, redis_server):
    _publish(store, channel, b"kept")
    top = _publish(store, channel, b"y" * 20_000)
    assert _kept(redis_server, channel) == []
    assert int(redis_server.client().hget(meta_key(channel), "bytes")) == 0
    # Recovery across the big message is impossible, and says so.
    from uwsgi_ws.protocol import Position, decide_recovery

    [state] = store.fetch([(channel, Position(1, _epoch(redis_server, channel)), False)])
    assert decide_recovery(Position(1, state.epoch or ""), state.epoch, state.top, state.history).recovered is False
    assert state.top == top
    _publish(store, channel, b"after")
    assert [decode_envelope(e).payload for e in _kept(redis_server, channel)] == [b"after"]


def _epoch(redis_server, channel: str) -> str:
    return redis_server.client().hget(meta_key(channel), "epoch").decode()


def test_history_written_before_bytes_were_counted_is_counted_once(store, channel, redis_server):
    for _ in range(5):
        _publish(store, channel, b"z" * 3000, history_max_bytes=0)
    redis_server.client().hdel(meta_key(channel), "bytes")  # as the previous publish script left it
    _publish(store, channel, b"z" * 3000)
    kept = _kept(redis_server, channel)
    assert len(kept) == 3 and sum(len(e) for e in kept) <= 10_000
    assert int(redis_server.client().hget(meta_key(channel), "bytes")) == sum(len(e) for e in kept)


def test_a_history_that_expired_alone_holds_no_bytes(store, channel, redis_server):
    _publish(store, channel, b"w" * 9000)
    redis_server.client().delete(log_key(channel))  # the stream expired, the counter lived on
    _publish(store, channel, b"w" * 9000)
    assert len(_kept(redis_server, channel)) == 1


def test_no_cap_keeps_every_byte(store, channel, redis_server):
    for _ in range(20):
        _publish(store, channel, b"v" * 1000, history_max_bytes=0)
    assert len(_kept(redis_server, channel)) == 20
