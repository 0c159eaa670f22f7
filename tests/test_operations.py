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
        # Each worker's share is in the registry (up to one heartbeat old); the scrape
        # shows their sum, whichever worker answers it.
        from uwsgi_ws.ops import Registry

        address = stack.ws_socket

        def shares() -> list[int]:
            return [
                w["connections"]["websocket"]
                for w in Registry(redis_server.client()).workers()
                if w["address"] == address
            ]

        wait_for(lambda: len(shares()) == 2 and sum(shares()) == 8, what="the registry's shares")
        for _ in range(10):
            assert metric(scrape(ops_port), "django_ws_connections", transport="websocket") == 8
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


# --------------------------------------------------------------------------- Django side


def test_publish_calls_and_errors_are_counted_in_django(project, redis_server, ws_settings, facility):
    from prometheus_client import REGISTRY

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    calls, errors, timed = (value(n) for n in ("django_ws_publish_calls_total", "django_ws_publish_errors_total",
                                               "django_ws_publish_seconds_count"))
    django_ws.publish(facility, "one", broadcast=True)
    assert value("django_ws_publish_calls_total") == calls + 1
    assert value("django_ws_publish_seconds_count") == timed + 1
    assert value("django_ws_publish_errors_total") == errors
    ws_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    with pytest.raises(django_ws.PublishError):
        django_ws.publish(facility, "lost", broadcast=True)
    assert value("django_ws_publish_errors_total") == errors + 1
    assert value("django_ws_publish_calls_total") == calls + 1


# --------------------------------------------------------------------------- registry and hand-over


def start_instance(project, tmp_path, name: str, **extra: str):
    """Start a websocket instance apart from any front, as the ini's [websocket] section
    runs it, on a unix socket in a private directory; return (process, socket path, log)."""
    import subprocess

    from tests.conftest import ROOT, UWSGI, _raise_fd_limit, private_dir, unix_socket_open

    directory = tmp_path / f"run-{name}"
    if not directory.exists():
        private_dir(tmp_path, f"run-{name}")
    sock = directory / "ws.sock"
    log = tmp_path / f"{name}.log"
    env = {**os.environ, **project.env, "DJANGO_WS_OFFLOAD_TO": str(sock), "DJANGO_WS_ASYNC": "500", **extra}
    proc = subprocess.Popen(
        [str(UWSGI), "--ini", "uwsgi.ini.example:websocket"],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        preexec_fn=_raise_fd_limit,
    )
    wait_for(lambda: unix_socket_open(str(sock)), what=f"websocket instance {name}", timeout=30)
    return proc, str(sock), log


def kill_for_good(proc) -> None:
    """SIGKILL an instance this test started: its workers, then its master."""
    from tests.conftest import descendants

    for pid in descendants(proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait(10)


def registry_instances(redis_server) -> dict[str, dict]:
    from uwsgi_ws.ops import Registry

    return {i.address: i.as_dict() for i in Registry(redis_server.client()).instances()}


class Handshakes:
    """Open a websocket through the front every ``pace`` seconds, in a thread, and close
    it once ready; count what succeeded and what failed, with their times."""

    def __init__(self, url: str, pace: float = 0.05) -> None:
        import threading

        self.url = url
        self.pace = pace
        self.ok: list[float] = []
        self.failed: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                ws = WS(self.url, timeout=5)
                try:
                    ws.ready()
                finally:
                    ws.close()
                self.ok.append(time.monotonic())
            except Exception:  # noqa: BLE001 - a failed handshake is what is counted
                self.failed.append(time.monotonic())
            self._stop.wait(max(0.0, self.pace - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.timeout(120)
def test_a_killed_instance_is_skipped_and_taken_again_when_back(project, redis_server, tmp_path, facility):
    from tests.conftest import private_dir

    beat = {"DJANGO_WS_REGISTRY_INTERVAL": "0.5"}
    first = str(private_dir(tmp_path, "run-a") / "ws.sock")
    other, second, other_log = start_instance(project, tmp_path, "b", **beat)
    stack = None
    handshakes = None
    try:
        stack = start_stack(
            "offload",
            project,
            tmp_path,
            DJANGO_WS_OFFLOAD_TO=first,
            EXAMPLE_OFFLOAD_TO=f"{first},{second}",
            DJANGO_WS_OFFLOAD_REGISTRY="1",
            DJANGO_WS_PROCESSES="2",
            **beat,
        )
        wait_for(
            lambda: {a for a, i in registry_instances(redis_server).items() if i["ready"]} >= {first, second},
            what="both instances ready in the registry",
        )

        def served_by_second() -> int:
            return other_log.read_text().count(f"GET /ws/{facility}")

        handshakes = Handshakes(stack.url(f"/ws/{facility}?subscribe-broadcast"))
        wait_for(lambda: served_by_second() >= 5 and len(handshakes.ok) >= 20, what="both instances serving")
        kill_for_good(other)
        killed = time.monotonic()
        wait_for(lambda: len([t for t in handshakes.ok if t > killed + 1]) >= 40, what="40 more handshakes", timeout=30)
        failed_while_dead = len(handshakes.failed)
        ok_while_dead = len([t for t in handshakes.ok if t > killed])
        # Back, on the same socket: it takes hand-overs again within 5 s.
        served_before = served_by_second()
        other, _, _ = start_instance(project, tmp_path, "b", **beat)
        back = time.monotonic()
        wait_for(lambda: served_by_second() > served_before, what="the instance back in service", timeout=15)
        taken_after = time.monotonic() - back
        handshakes.stop()
        print(
            f"\nSIGKILL of one of two instances: {failed_while_dead} failed handshake(s), {ok_while_dead} "
            f"succeeded on the survivor; back in service {taken_after:.2f}s after its restart"
        )
        assert failed_while_dead <= 3
        assert taken_after < 5.0
        assert len(handshakes.failed) == failed_while_dead  # none failed after the restart
    finally:
        if handshakes is not None:
            handshakes.stop()
        if stack is not None:
            for proc in stack.procs:
                stop(proc)
        stop(other)


# --------------------------------------------------------------------------- drain and status


def close_times(clients: list[WS], timeout: float = 30.0) -> list[tuple[float, int | None]]:
    """Read every client until its close frame, in threads; return (time, code) of each."""
    import threading

    import websocket

    results: list[tuple[float, int | None]] = []
    lock = threading.Lock()

    def read(ws: WS) -> None:
        ws.conn.settimeout(timeout)
        try:
            while True:
                opcode, data = ws.conn.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                    break
        except Exception:  # noqa: BLE001 - reported as no code
            code = None
        with lock:
            results.append((time.monotonic(), code))

    threads = [threading.Thread(target=read, args=(ws,)) for ws in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    return results


def most_in_any(times: list[float], span: float) -> int:
    times = sorted(times)
    return max((sum(1 for t in times[i:] if t - start < span) for i, start in enumerate(times)), default=0)


@pytest.mark.timeout(120)
def test_ws_drain_spreads_1012_over_the_window_and_ws_status_shows_it(project, redis_server, tmp_path, facility):
    import json
    from io import StringIO

    from django.core.management import call_command

    stack, ops_port = ops_stack(
        project, tmp_path, DJANGO_WS_REGISTRY_INTERVAL="0.2", DJANGO_WS_DRAIN_WINDOW="2"
    )
    address = stack.ws_socket
    try:
        url = stack.url(f"/ws/{facility}?subscribe-broadcast")
        clients = [WS(url) for _ in range(20)]
        for ws in clients:
            ws.ready()

        def status() -> dict:
            out = StringIO()
            call_command("ws_status", "--json", stdout=out)
            return json.loads(out.getvalue())

        def ours(report: dict) -> dict | None:
            return next((i for i in report["instances"] if i["address"] == address), None)

        def counted() -> dict | None:
            report = status()
            return report if (ours(report) or {}).get("connections") == 20 else None

        report = wait_for(counted, what="ws_status showing the 20 connections")
        assert ours(report)["ready"] is True and ours(report)["workers"] == 1
        assert {"channel": "{ws:" + facility + ":broadcast}", "subscribers": 20} in report["busiest_channels"]
        text = StringIO()
        call_command("ws_status", stdout=text)
        assert address in text.getvalue() and "ready" in text.getvalue()

        ordered = time.monotonic()
        call_command("ws_drain", address, stdout=StringIO())
        wait_for(lambda: http_get(ops_port, "/health/ready") == (503, "draining\n"), what="not ready", timeout=5)
        closes = close_times(clients)
        assert [code for _, code in closes] == [1012] * 20
        times = [t for t, _ in closes]
        spread = max(times) - min(times)
        print(f"\ndrain: 20 closes from {min(times) - ordered:.2f}s to {max(times) - ordered:.2f}s after the order")
        # one close per 0.1 s slot of the 2 s window: never more than 6 in any 0.5 s
        assert most_in_any(times, 0.5) <= 7
        assert spread >= 1.5
        assert (ours(status()) or {}).get("draining") is True
        refused = status_line(stack, handshake_vars(None, key=new_key()))  # no ticket: refused as ever
        assert refused.startswith(b"HTTP/1.1 403")
        with pytest.raises(Exception, match="503"):
            WS(url)  # handed over to the drained instance: refused
        call_command("ws_drain", address, "--cancel", stdout=StringIO())
        wait_for(lambda: _status(ops_port, "/health/ready") == 200, what="ready again", timeout=5)
        again = WS(url)
        again.ready()
        again.close()
    finally:
        for proc in stack.procs:
            stop(proc)


# --------------------------------------------------------------------------- dashboard


def test_the_grafana_dashboard_uses_only_exported_metrics():
    """Every metric name in docs/guide/grafana-dashboard.json is one the code exports (with
    the suffixes Prometheus adds to histograms), and every exported one is shown."""
    import json
    import re

    from django_ws.metrics import METRICS as DJANGO_METRICS
    from tests.conftest import ROOT
    from uwsgi_ws.ops import METRICS

    dashboard = json.loads((ROOT / "docs" / "guide" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bdjango_ws_[a-z_]+", e)}
    exported = set()
    for name, (kind, _) in {**METRICS, **DJANGO_METRICS}.items():
        exported.add(name)
        if kind == "histogram":
            exported |= {name + "_bucket", name + "_sum", name + "_count"}
    assert used - exported == set()
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert set(METRICS) | set(DJANGO_METRICS) <= shown


def test_exported_metric_names_are_the_declared_ones():
    """What /metrics really serves is exactly METRICS (the dashboard test relies on it)."""
    from prometheus_client.parser import text_string_to_metric_families

    from uwsgi_ws.ops import METRICS, merge_snapshots, render_metrics

    body, _ = render_metrics(merge_snapshots([]))
    names = {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(body.decode())}
    assert names == set(METRICS)
