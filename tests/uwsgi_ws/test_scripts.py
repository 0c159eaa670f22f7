"""The Lua scripts' NOSCRIPT fallback, against real Redis servers.

Scripts run with EVALSHA; a server that answers NOSCRIPT (restarted, flushed, a
Cluster master that never saw the script) gets EVAL for exactly the calls it
refused, never a second run of a call that went through (that would publish twice).
"""

from __future__ import annotations

import uuid

import pytest
import redis

from tests.conftest import start_redis, stop
from uwsgi_ws.protocol import KIND_TEXT
from uwsgi_ws.store import _PUBLISH, Store


@pytest.fixture
def private(tmp_path):
    server = start_redis(tmp_path)
    yield server
    stop(server.proc)


def calls(client: redis.Redis) -> dict[str, int]:
    return {k: v["calls"] for k, v in client.info("commandstats").items()}


def test_a_flushed_script_is_sent_again_once_and_nothing_runs_twice(private):
    client = private.client()
    store = Store(client)
    channels = ["{t:" + uuid.uuid4().hex + ":broadcast}" for _ in range(3)]
    store.publish(channels, KIND_TEXT, b"first", history_size=10, history_ttl=60)
    client.script_flush()
    client.config_resetstat()
    published = store.publish(channels, KIND_TEXT, b"second", history_size=10, history_ttl=60)
    assert [p.offset for p in published] == [2, 2, 2]  # each channel's message exactly once
    stats = calls(client)
    assert stats["cmdstat_evalsha"] == 3 and stats["cmdstat_eval"] == 3  # refused, then sent
    client.config_resetstat()
    store.publish(channels, KIND_TEXT, b"third", history_size=10, history_ttl=60)
    stats = calls(client)
    assert stats["cmdstat_evalsha"] == 3 and "cmdstat_eval" not in stats  # cached again
    for channel in channels:
        assert client.xlen(channel + ":log") == 3


def test_only_the_refused_calls_run_again(private, tmp_path):
    # Two servers in one run_many, as two Cluster masters would be: one has the
    # script, one does not. A client that sends each call to its own server stands
    # for the cluster client's routing.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = start_redis(other_dir)
    try:
        first, second = private.client(), other.client()
        first.script_load(_PUBLISH.source)

        class TwoServers:
            """A client whose pipeline sends each call to the server that owns its keys."""

            def pipeline(self, transaction: bool = False) -> Pipeline:
                return Pipeline()

        class Pipeline:
            def __init__(self) -> None:
                self.calls: list[tuple] = []

            def execute_command(self, *args):  # type: ignore[no-untyped-def]
                self.calls.append(args)

            def execute(self, raise_on_error: bool = True) -> list:
                out = []
                for args in self.calls:
                    target = second if keys[1] in args else first
                    try:
                        out.append(target.execute_command(*args))
                    except redis.RedisError as exc:
                        out.append(exc)
                return out

        keys = ["{t:" + uuid.uuid4().hex + ":broadcast}" for _ in range(2)]
        calls_ = [((k + ":meta", k + ":log", k), (b"", KIND_TEXT, b"x", 10, 60000, "PUBLISH", 0)) for k in keys]
        results = _PUBLISH.run_many(TwoServers(), calls_)  # type: ignore[arg-type]
        assert [r[0] for r in results] == [1, 1]
        assert first.xlen(keys[0] + ":log") == 1 and second.xlen(keys[1] + ":log") == 1
        assert calls(first).get("cmdstat_eval") is None  # the server that had it ran it once
        assert calls(second)["cmdstat_eval"] == 1
    finally:
        stop(other.proc)
