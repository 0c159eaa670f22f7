"""Operations on real processes: metrics, health, the registry, hand-over, drain.

The websocket instance's operations socket (DJANGO_WS_OPS_HTTP) is a loopback port
of the stack under test; its Redis is the suite's, or a private one where a test
stops it.
"""

from __future__ import annotations

import http.client
import os
import signal
import time

import pytest

import django_ws
from tests.conftest import WS, free_port, start_redis, start_stack, stop, wait_for
from tests.direct import handshake_vars, new_key, status_line


def http_get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Read /metrics: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = http_get(port, "/metrics")
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def ops_stack(project, tmp_path, **extra: str):
    ops_port = free_port()
    stack = start_stack("offload", project, tmp_path, DJANGO_WS_OPS_HTTP=f"127.0.0.1:{ops_port}", **extra)
    wait_for(lambda: _status(ops_port, "/health/live") == 200, what="operations socket")
    return stack, ops_port


def _status(port: int, path: str) -> int | None:
    try:
        return http_get(port, path)[0]
    except OSError:
        return None


# --------------------------------------------------------------------------- metrics


@pytest.mark.timeout(90)
def test_one_scrape_sums_the_workers_of_an_instance(project, redis_server, tmp_path, facility):
    stack, ops_port = ops_stack(project, tmp_path, DJANGO_WS_WORKERS="2", DJANGO_WS_REGISTRY_INTERVAL="0.2")
    clients = []
    try:
        url = stack.url(f"/ws/{facility}?subscribe-broadcast")
        wait_for(lambda: metric(scrape(ops_port), "django_ws_workers") == 2, what="both workers registered")
        before = scrape(ops_port)
        clients = [WS(url) for _ in range(8)]
        for ws in clients:
            ws.ready()
        django_ws.publish(facility, "counted", broadcast=True)
        for ws in clients:
            assert ws.next()["data"] == "counted"
        # A refused hand-over (no ticket) is counted by reason.
        assert status_line(stack, handshake_vars(None, key=new_key())).startswith(b"HTTP/1.1 403")

        def settled():
            now = scrape(ops_port)
            delivered = metric(now, "django_ws_messages_delivered_total") - metric(
                before, "django_ws_messages_delivered_total"
            )
            opened = metric(now, "django_ws_connections", transport="websocket")
            return now if (delivered, opened) == (8, 8) else None

        after = wait_for(settled, what="8 connections and 8 deliveries in one scrape", timeout=15)
        # The connections really are spread over the two workers' snapshots (each
        # worker's share is in the registry); the scrape shows their sum.
        from uwsgi_ws.ops import Registry

        address = stack.ws_socket
        shares = [
            w["connections"]["websocket"] for w in Registry(redis_server.client()).workers() if w["address"] == address
        ]
        assert len(shares) == 2 and sum(shares) == 8
        assert metric(after, "django_ws_handshakes_total") - metric(before, "django_ws_handshakes_total") == 8
        refused = metric(after, "django_ws_handshakes_refused_total", reason="ticket") or 0.0
        assert refused - (metric(before, "django_ws_handshakes_refused_total", reason="ticket") or 0.0) == 1
        lag_count = metric(after, "django_ws_delivery_lag_seconds_count") - metric(
            before, "django_ws_delivery_lag_seconds_count"
        )
        assert lag_count == 8
        assert metric(after, "django_ws_delivery_lag_seconds_bucket", le="+Inf") == metric(
            after, "django_ws_delivery_lag_seconds_count"
        )
        assert metric(after, "django_ws_subscriptions") >= 8
        assert metric(after, "django_ws_ready") == 1
        for ws in clients:
            ws.close()
        wait_for(
            lambda: metric(scrape(ops_port), "django_ws_connections", transport="websocket") == 0,
            what="closed connections leave the gauge",
        )
        closes = scrape(ops_port)
        assert metric(closes, "django_ws_closes_total", code="1000") - (
            metric(before, "django_ws_closes_total", code="1000") or 0.0
        ) == 8
    finally:
        for proc in stack.procs:
            stop(proc)


# --------------------------------------------------------------------------- health


@pytest.mark.timeout(90)
def test_ready_follows_redis_and_live_does_not(project, tmp_path):
    private = start_redis(tmp_path)
    stack = None
    try:
        stack, ops_port = ops_stack(project, tmp_path, DJANGO_WS_REDIS_URL=private.url)
        wait_for(lambda: _status(ops_port, "/health/ready") == 200, what="ready")
        stop(private.proc, signal.SIGKILL)
        wait_for(lambda: _status(ops_port, "/health/ready") == 503, what="not ready without Redis")
        assert http_get(ops_port, "/health/live") == (200, "live\n")
        private = start_redis(tmp_path, private.port)
        wait_for(lambda: _status(ops_port, "/health/ready") == 200, what="ready again", timeout=30)
    finally:
        if stack is not None:
            for proc in stack.procs:
                stop(proc)
        stop(private.proc)
