"""One exception root, as uwsgi_ws/exceptions.py promises, and no Redis text in errors."""

from __future__ import annotations

import pytest
import redis

import django_ws
from uwsgi_ws.exceptions import (
    InvalidArgument,
    PublishError,
    RedisUnavailable,
    SubscribeTimeout,
    UnsupportedType,
    WebSocketError,
)
from uwsgi_ws.protocol import KIND_TEXT, check_close, encode_payload
from uwsgi_ws.store import Store


@pytest.mark.parametrize(
    "call,kind",
    [
        (lambda: django_ws.publish("bad..name", "x", broadcast=True), InvalidArgument),
        (lambda: django_ws.publish("ok", "x"), InvalidArgument),
        (lambda: django_ws.publish("ok", object(), broadcast=True), UnsupportedType),
        (lambda: django_ws.publish("ok", "x", users="alice"), UnsupportedType),
        (lambda: django_ws.publish("ok", "x", users=[object()]), UnsupportedType),
        (lambda: django_ws.disconnect(), InvalidArgument),
        (lambda: django_ws.disconnect(users=["a"], code=1000), InvalidArgument),
        (lambda: check_close(4100, "x" * 200), InvalidArgument),
        (lambda: encode_payload({1j}), UnsupportedType),
    ],
)
def test_bad_calls_raise_under_the_root_and_the_builtin_they_always_raised(project, call, kind):
    with pytest.raises(kind) as info:
        call()
    assert isinstance(info.value, WebSocketError)
    assert isinstance(info.value, ValueError if kind is InvalidArgument else TypeError)


def test_redis_errors_are_ours_and_do_not_carry_the_redis_text():
    store = Store(redis.Redis(port=1, socket_connect_timeout=0.2))
    with pytest.raises(PublishError) as published:
        store.publish(["{t:f:broadcast}"], KIND_TEXT, b"x", history_size=1, history_ttl=1)
    with pytest.raises(RedisUnavailable) as fetched:
        store.fetch([("{t:f:broadcast}", None, False)])
    with pytest.raises(PublishError) as allowed:
        store.allow("{t:rate:x}", rate=1, burst=1)
    for info in (published, fetched, allowed):
        text = str(info.value)
        assert "ConnectionError" in text  # the kind of failure, for the log
        assert "connecting to" not in text and "111" not in text  # not redis-py's own text
        assert isinstance(info.value.__cause__, redis.RedisError)  # which the log keeps


def test_subscribe_timeout_is_under_the_root():
    assert issubclass(SubscribeTimeout, RedisUnavailable) and issubclass(SubscribeTimeout, WebSocketError)
