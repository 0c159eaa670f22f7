"""Classic PUBLISH against SPUBLISH on a Redis Cluster of three masters, across hosts.

Builds the multi-host bed of tests/lab.py (root needed): a Cluster of three masters
with a replica each, two websocket hosts, one client host. For each mode in turn
the two websocket hosts run with ``DJANGO_WS_PUBLISH_COMMAND`` set to it; websocket
clients on the client host subscribe to many broadcast channels (``--clients`` per
channel on each websocket host); publisher threads on the client host publish to the
channels in turn for ``--seconds``. Printed per mode: messages/s published,
deliveries/s counted at the clients (and any missing), and each Redis node's CPU
(``INFO cpu``, user + system) per 1,000 messages published to the whole Cluster.

    sudo .venv/bin/python bench/cluster.py [--channels 30] [--clients 2] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import EXAMPLE, WS, Project, wait_for  # noqa: E402
from tests.lab import REDIS_HOSTS, WEBSOCKET_HOSTS, Lab, available  # noqa: E402

MODES = ("PUBLISH", "SPUBLISH")


def cpu(lab: Lab) -> dict[str, float]:
    """Seconds of CPU (user + system) each Redis node has used so far."""
    out = {}
    for address in REDIS_HOSTS.values():
        fields = dict(line.split(":", 1) for line in lab.cli(address, "INFO", "cpu").splitlines() if ":" in line)
        out[address] = float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])
    return out


class Counter(threading.Thread):
    """Read one websocket until told to stop; count the messages."""

    def __init__(self, ws: WS) -> None:
        super().__init__(daemon=True)
        self.ws, self.count, self.stopping = ws, 0, False

    def run(self) -> None:
        while not self.stopping:
            try:
                frame = self.ws.next()
            except Exception:
                if self.stopping:
                    return
                raise
            if frame["type"] == "message":
                self.count += 1


def run_mode(lab: Lab, project: Project, mode: str, args: argparse.Namespace) -> dict:
    import django_ws
    import django_ws.conf
    from uwsgi_ws.exceptions import PublishError

    os.environ["DJANGO_WS_PUBLISH_COMMAND"] = mode
    django_ws.conf._cached = None
    lab.start_websocket_hosts(project, tag=mode.lower(), DJANGO_WS_PUBLISH_COMMAND=mode)
    client = lab.hosts["client"]
    tag = secrets.token_hex(3)
    facilities = [f"bench{tag}{i}" for i in range(args.channels)]
    counters = []
    for facility in facilities:
        for host in WEBSOCKET_HOSTS:
            for _ in range(args.clients):
                ws = client.run(WS, lab.stacks[host].url(f"/ws/{facility}?subscribe-broadcast"), timeout=30)
                ws.ready()
                counters.append(Counter(ws))
    for counter in counters:
        counter.start()
    published = [0] * args.publishers
    errors = [0] * args.publishers
    stop_at = 0.0

    def publisher(index: int) -> None:
        i = index
        while time.monotonic() < stop_at:
            try:
                django_ws.publish(facilities[i % len(facilities)], "x" * 64, broadcast=True)
                published[index] += 1
            except PublishError:
                errors[index] += 1
            i += args.publishers

    # The nodes' own background work (cron, cluster bus gossip), measured idle and
    # taken off the figures below.
    idle_start, idle_before = time.monotonic(), cpu(lab)
    time.sleep(args.idle)
    idle_after, idle_seconds = cpu(lab), time.monotonic() - idle_start
    stop_at = time.monotonic() + args.seconds
    before = cpu(lab)
    start = time.monotonic()
    threads = [threading.Thread(target=client.run, args=(publisher, n)) for n in range(args.publishers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    after = cpu(lab)
    sent = sum(published)
    expected = sent * len(WEBSOCKET_HOSTS) * args.clients
    try:
        wait_for(lambda: sum(c.count for c in counters) >= expected, timeout=30, what="every delivery")
    except TimeoutError:
        pass
    delivered = sum(c.count for c in counters)
    last = time.monotonic() - start
    for counter in counters:
        counter.stopping = True
        counter.ws.close()
    lab.stop_websocket_hosts()
    masters = set(lab.masters())

    def busy(address: str) -> float:
        idle_rate = (idle_after[address] - idle_before[address]) / idle_seconds
        return max(0.0, after[address] - before[address] - idle_rate * elapsed)

    owners: dict[str, int] = {}
    for facility in facilities:
        owner = lab.owner("{" + f"{django_ws.conf.get_settings().prefix}:{facility}:broadcast" + "}")
        owners[owner] = owners.get(owner, 0) + 1
    return {
        "mode": mode,
        "messages": sent,
        "publish_errors": sum(errors),
        "seconds": round(elapsed, 2),
        "messages_per_s": round(sent / elapsed),
        "deliveries": delivered,
        "missing": expected - delivered,
        "deliveries_per_s": round(delivered / last),
        "channels_per_master": owners,
        # CPU seconds beyond idle, per 1,000 messages published to the whole Cluster, in ms.
        "cpu_ms_per_1000_messages": {
            f"{address} ({'master' if address in masters else 'replica'})": round(busy(address) * 1e6 / max(1, sent), 1)
            for address in REDIS_HOSTS.values()
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=30)
    parser.add_argument("--clients", type=int, default=2, help="per channel on each websocket host")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--idle", type=float, default=3, help="seconds of idle CPU measured before the load")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    reason = available()
    if reason:
        print(f"cannot build the bed: {reason}", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="dwsbench-"))
    env = {
        "DJANGO_SETTINGS_MODULE": "chat.settings",
        "EXAMPLE_DB": str(tmp / "db.sqlite3"),
        "DJANGO_WS_SECRET": secrets.token_hex(32),
        "EXAMPLE_FACILITIES": "bench*",
    }
    results = []
    with Lab(tmp) as lab:
        lab.start_cluster()
        env["DJANGO_WS_REDIS_URL"] = lab.cluster_url
        os.environ.update(env)
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--verbosity", "0"], cwd=EXAMPLE, check=True, timeout=120
        )
        sys.path.insert(0, str(EXAMPLE))
        import django

        django.setup()
        project = Project(env=env)
        for mode in MODES:
            result = run_mode(lab, project, mode, args)
            results.append(result)
            print(json.dumps(result, indent=2), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
