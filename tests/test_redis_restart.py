"""The Hub survives Redis going away: websockets stay open, subscriptions come back."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import WS, free_port, start_redis, start_stack, stop, wait_for


@pytest.mark.timeout(120)
def test_hub_resubscribes_after_redis_restart_and_clients_are_told_what_was_lost(project, tmp_path):
    """Redis restarts empty: the open websocket keeps working and learns it was not recovered."""
    import redis

    from uwsgi_ws.protocol import KIND_TEXT, Audience, Kind, channel_name
    from uwsgi_ws.store import Store

    port = free_port()

    url = f"redis://127.0.0.1:{port}/0"
    redis_proc = start_redis(tmp_path, port).proc
    stack = start_stack("offload", project, tmp_path, DJANGO_WS_REDIS_URL=url)
    store = Store(redis.Redis.from_url(url))
    channel = channel_name("ws", "restart", Audience(Kind.BROADCAST))

    def publish(text: str) -> None:
        store.publish([channel], KIND_TEXT, text.encode(), history_size=100, history_ttl=60)

    try:
        ws = WS(stack.url("/ws/restart?subscribe-broadcast"))
        ws.ready()
        publish("before")
        before = ws.next()
        assert before["data"] == "before"

        stop(redis_proc, signal.SIGTERM)
        redis_proc = start_redis(tmp_path, port).proc  # same port, empty: the epoch changes
        client = redis.Redis.from_url(url)
        # The Hub is back when Redis counts its subscription again.
        wait_for(lambda: client.pubsub_numsub(channel)[0][1] == 1, timeout=30, what="Hub re-subscription")
        frame = ws.next()
        assert frame["type"] == "subscribed" and frame["recovered"] is False
        assert frame["epoch"] != before["epoch"] or frame["offset"] == 0
        publish("after")
        assert ws.next()["data"] == "after"
    finally:
        for proc in stack.procs:
            stop(proc)
        stop(redis_proc, signal.SIGTERM)


@pytest.mark.timeout(60)
def test_messages_published_while_the_hub_reconnects_arrive_once_in_order(offload_stack, redis_server, facility):
    """The subscriber connection is killed; what is published meanwhile comes from history."""
    import django_ws

    ws = WS(offload_stack.url(f"/ws/{facility}?subscribe-broadcast"))
    ws.ready()
    client = redis_server.client()
    killed = client.client_kill_filter(_type="pubsub")
    assert killed >= 1
    for i in range(5):
        django_ws.publish(facility, f"m{i}", broadcast=True)
    django_ws.publish(facility, "end", broadcast=True)
    data = ws.until("end")
    assert data == [f"m{i}" for i in range(5)]
    ws.close()


@pytest.mark.timeout(60)
def test_publish_retries_until_redis_is_back(project, tmp_path, ws_settings, caplog):
    """With PUBLISH_RETRIES, a publish during a short outage waits for Redis instead of failing."""
    import threading

    import django_ws

    port = free_port()
    ws_settings(REDIS_URL=f"redis://127.0.0.1:{port}/0", PUBLISH_RETRIES=8, PUBLISH_RETRY_DELAY=0.05)
    outcome = {}

    def publish():
        try:
            outcome["result"] = django_ws.publish("retry", "after the outage", broadcast=True)
        except django_ws.PublishError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=publish)
    caplog.set_level("WARNING", logger="django_ws.publishing")
    thread.start()  # Redis is not there yet: the first attempt fails, and is retried
    wait_for(lambda: any("retrying" in r.getMessage() for r in caplog.records), what="a retry")
    proc = start_redis(tmp_path, port).proc
    try:
        thread.join(30)
        assert "error" not in outcome, outcome
        assert outcome["result"][0].offset == 1
    finally:
        stop(proc, signal.SIGTERM)
