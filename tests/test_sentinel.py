"""Redis Sentinel: the same URL for Django and the websocket instance, and a failover."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.conftest import REDIS_SERVER, WS, free_port, port_open, start_redis, start_stack, stop, wait_for


def start_sentinel(tmp_path, primary: int) -> subprocess.Popen:
    """A sentinel watching the primary on port ``primary`` as "mymaster"; its port is in ``.port``."""
    sentinel = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {primary} 1\n"
        "sentinel down-after-milliseconds mymaster 500\n"
        "sentinel failover-timeout mymaster 5000\n"
    )
    proc = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
    proc.port = sentinel  # type: ignore[attr-defined]
    wait_for(lambda: port_open(sentinel), what="sentinel")
    return proc


def test_a_small_pool_makes_callers_wait_with_sentinel(tmp_path):
    # Right after a failover every connection of a worker needs Redis at once: with
    # the pool's bound reached, callers wait for a connection instead of failing.
    from tests.conftest import many_waiting_for_a_small_pool
    from uwsgi_ws.redis_url import make_client

    primary = start_redis(tmp_path)
    sentinel = start_sentinel(tmp_path, primary.port)
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"  # type: ignore[attr-defined]
        client = make_client(url, max_connections=2, wait=10, socket_timeout=5)
        assert many_waiting_for_a_small_pool(client) == []
        client.close()
    finally:
        stop(sentinel, signal.SIGTERM)
        stop(primary.proc, signal.SIGTERM)


@pytest.mark.timeout(120)
def test_websockets_survive_a_sentinel_failover(project, tmp_path, ws_settings, facility):
    import redis

    import django_ws

    primary, replica = free_port(), free_port()
    procs = [start_redis(tmp_path, primary).proc]
    replica_dir = tmp_path / "replica"
    replica_dir.mkdir()
    procs.append(start_redis(replica_dir, replica, "--replicaof", "127.0.0.1", str(primary)).proc)
    procs.append(start_sentinel(tmp_path, primary))
    sentinel = procs[-1].port  # type: ignore[attr-defined]
    sentinel_client = redis.Redis(port=sentinel)
    wait_for(
        lambda: sentinel_client.execute_command("SENTINEL", "REPLICAS", "mymaster"),
        what="sentinel to see the replica",
        timeout=30,
    )
    url = f"redis+sentinel://127.0.0.1:{sentinel}/mymaster/0"
    ws_settings(REDIS_URL=url, PUBLISH_RETRIES=10, PUBLISH_RETRY_DELAY=0.2)
    stack = start_stack("offload", project, tmp_path, DJANGO_WS_REDIS_URL=url)
    try:
        ws = WS(stack.url(f"/ws/{facility}?subscribe-broadcast"))
        ws.ready()
        django_ws.publish(facility, "via sentinel", broadcast=True)
        assert ws.next()["data"] == "via sentinel"
        wait_for(lambda: redis.Redis(port=replica).exists(f"{{ws:{facility}:broadcast}}:meta"), what="replication")

        stop(procs[0], signal.SIGKILL)  # the primary dies; the sentinel promotes the replica

        def promoted() -> bool:
            host, port = sentinel_client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
            return int(port) == replica

        wait_for(promoted, what="failover", timeout=60)
        django_ws.publish(facility, "after failover", broadcast=True)
        # The same websocket, still open: its Hub reconnected to the new primary.
        assert ws.until("after failover") == []
    finally:
        for proc in stack.procs:
            stop(proc)
        for proc in procs:
            stop(proc, signal.SIGTERM)
