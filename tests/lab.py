"""A multi-host test bed on one machine: Linux network namespaces joined by a bridge.

Each host is a network namespace with one veth link (``eth0``, an address from the
documentation range 192.0.2.0/24) to a bridge that lives in a namespace of its own.
There is no default route anywhere and nothing links to the machine's own network,
so nothing is routed outside. Addresses, not ports, tell the nodes apart: every
Redis listens on 6379 of its own host.

    redis hosts r1..r6   192.0.2.11 .. 192.0.2.16   (r1-r3 masters, r4-r6 replicas)
    websocket hosts      ws1 192.0.2.21, ws2 192.0.2.22 (a front + a websocket instance each)
    client host          192.0.2.31                 (websocket clients and publishers)

Cutting a host's link (:meth:`Lab.cut`) takes its bridge port down: packets are
dropped, no connection is reset, as when a cable or a switch port fails.

Code of the test process reaches the hosts through :meth:`Host.run`, which runs a
function in a thread that joined the host's namespace: every socket made there
belongs to that host (and may then be used from any thread).

Needs root (``ip netns``). ``python -m tests.lab`` (what ``scripts/cluster-lab.sh``
runs) builds the whole bed, prints how to reach it and tears it down on Ctrl-C.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.conftest import REDIS_SERVER, Stack, start_stack, stop, wait_for

T = TypeVar("T")

IP = shutil.which("ip") or "/usr/sbin/ip"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
PREFIX = "dwslab"  # namespace names: dwslab-<pid of the test process>-<host>
NET = "192.0.2."
REDIS_HOSTS = {f"r{i}": f"{NET}{10 + i}" for i in range(1, 7)}
WEBSOCKET_HOSTS = {"ws1": f"{NET}21", "ws2": f"{NET}22"}
CLIENT_HOST = {"client": f"{NET}31"}
REDIS_PORT = 6379
HTTP_PORT = 8000
_CLONE_NEWNET = 0x40000000


def available() -> str | None:
    """Why the bed cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.path.exists(IP):
        return "no ip command (iproute2)"
    return None


def ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=20)


def _join(namespace: str) -> None:
    """Move the calling thread into ``namespace`` (sockets made after belong to it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Host:
    name: str
    address: str
    namespace: str
    port: str  # the bridge's end of the host's link
    procs: list[subprocess.Popen] = field(default_factory=list)
    _pool: concurrent.futures.ThreadPoolExecutor | None = None

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on this host (in a thread inside its namespace) and return its result."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix=self.name, initializer=_join, initargs=(self.namespace,)
            )
        return self._pool.submit(fn, *args, **kwargs).result()

    def command(self, *args: str) -> list[str]:
        """``args`` wrapped to run on this host."""
        return [IP, "netns", "exec", self.namespace, *args]

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(self.command(*args), **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Stop what runs on this host (processes this bed started, by pid)."""
        for proc in self.procs:
            if proc.poll() is None:
                stop(proc, timeout=10)

    def reachable(self, address: str, port: int) -> bool:
        """Whether a TCP connection from this host to ``address:port`` succeeds."""

        def attempt() -> bool:
            try:
                with socket.create_connection((address, port), timeout=0.5):
                    return True
            except OSError:
                return False

        return self.run(attempt)

    def close(self) -> None:
        self.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class Lab:
    """The hosts, the bridge, and what runs on them. Use as a context manager."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = f"{PREFIX}-{os.getpid()}"
        self.bridge = f"{self.tag}-br"
        self.hosts: dict[str, Host] = {}
        self.stacks: dict[str, Stack] = {}
        self.redis: dict[str, subprocess.Popen] = {}

    # ----------------------------------------------------------------- network

    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        remove_stale()
        ip("netns", "add", self.bridge)
        ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge, "link", "set", "br0", "up")
        for i, (name, address) in enumerate({**REDIS_HOSTS, **WEBSOCKET_HOSTS, **CLIENT_HOST}.items()):
            namespace = f"{self.tag}-{name}"
            ip("netns", "add", namespace)
            port = f"p{i}-{name}"
            self.hosts[name] = Host(name, address, namespace, port)
            ip("link", "add", "eth0", "netns", namespace, "type", "veth", "peer", "name", port, "netns", self.bridge)
            ip("-n", self.bridge, "link", "set", port, "master", "br0", "up")
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")
            ip("-n", namespace, "link", "set", "lo", "up")

    def cut(self, name: str) -> None:
        """Take host ``name``'s link down at the bridge: its packets are dropped."""
        ip("-n", self.bridge, "link", "set", self.hosts[name].port, "down")

    def heal(self, name: str) -> None:
        ip("-n", self.bridge, "link", "set", self.hosts[name].port, "up")

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()
        for namespace in [h.namespace for h in self.hosts.values()] + [self.bridge]:
            subprocess.run([IP, "netns", "del", namespace], capture_output=True, timeout=20)
        self.hosts.clear()

    # ----------------------------------------------------------------- Redis

    @property
    def cluster_url(self) -> str:
        return "redis+cluster://" + ",".join(f"{a}:{REDIS_PORT}" for a in list(REDIS_HOSTS.values())[:3])

    def start_cluster(self, *, node_timeout: int = 1000) -> None:
        """Three masters (r1-r3) with a replica each (r4-r6), one per host."""
        for name, address in REDIS_HOSTS.items():
            d = self.tmp / name
            d.mkdir()
            host = self.hosts[name]
            self.redis[name] = host.popen(
                [
                    REDIS_SERVER,
                    "--bind", address, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no",
                    "--protected-mode", "no",  # no password, and nothing outside the bed reaches it
                    "--dir", str(d), "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                    "--cluster-node-timeout", str(node_timeout), "--cluster-require-full-coverage", "no",
                ],
                stdout=(d / "redis.log").open("wb"),
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        client = self.hosts["client"]
        for address in REDIS_HOSTS.values():
            wait_for(lambda a=address: client.reachable(a, REDIS_PORT), what=f"redis at {address}")
        nodes = [f"{a}:{REDIS_PORT}" for a in REDIS_HOSTS.values()]
        made = subprocess.run(
            client.command(REDIS_CLI, "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if made.returncode:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{made.stdout[-2000:]}{made.stderr[-2000:]}")
        for address in REDIS_HOSTS.values():
            wait_for(
                lambda a=address: "cluster_state:ok" in self.cli(a, "CLUSTER", "INFO"),
                what=f"cluster state ok at {address}",
                timeout=30,
            )
        # Masters r1-r3 with their replicas attached.
        wait_for(lambda: len(self.replicas()) == 3, what="three replicas attached", timeout=30)

    def cli(self, address: str, *args: str) -> str:
        """``redis-cli`` against the node at ``address``, from the client host."""
        command = self.hosts["client"].command(REDIS_CLI, "-h", address, "-p", str(REDIS_PORT), *args)
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout

    def table(self) -> list[dict[str, Any]]:
        """CLUSTER NODES from the first node that answers."""
        for address in REDIS_HOSTS.values():
            text = self.cli(address, "CLUSTER", "NODES")
            if text.strip():
                break
        rows = []
        for line in text.splitlines():
            fields = line.split()
            address = fields[1].split("@")[0].rsplit(":", 1)[0]
            rows.append(
                {
                    "id": fields[0],
                    "address": address,
                    "node": address,
                    "master": "master" in fields[2] and "fail" not in fields[2],
                    "of": fields[3],
                    "slots": fields[8:],
                }
            )
        return rows

    def replicas(self) -> dict[str, str]:
        """{master address: replica address}."""
        rows = self.table()
        ids = {row["id"]: row["address"] for row in rows}
        return {ids[row["of"]]: row["address"] for row in rows if row["of"] in ids}

    def owner(self, key: str) -> str:
        """The address of the master owning ``key``'s slot."""
        slot = int(
            self.cli(REDIS_HOSTS["r1"], "CLUSTER", "KEYSLOT", key)
            or self.cli(REDIS_HOSTS["r2"], "CLUSTER", "KEYSLOT", key)
        )
        for row in self.table():
            if not row["master"]:
                continue
            for part in row["slots"]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return str(row["address"])
        raise LookupError(key)

    def masters(self) -> list[str]:
        return sorted(row["address"] for row in self.table() if row["master"] and row["slots"])

    def hub_connections(self, host: str) -> dict[str, int]:
        """{master address: subscriber connections from websocket host ``host``}."""
        address = self.hosts[host].address
        counts = {}
        for master in self.masters():
            lines = self.cli(master, "CLIENT", "LIST").splitlines()
            counts[master] = sum(1 for x in lines if f" addr={address}:" in x and " name=django_ws:hub:" in x)
        return counts

    def migrate(self, slot: int, source: str, target: str, *, between: Callable[[], None] = lambda: None) -> None:
        """Move ``slot`` and its keys from the master at ``source`` to ``target`` (addresses)."""
        from tests.test_cluster import migrate_slot

        migrate_slot(self.cli, self.table(), slot, source, target, (target, REDIS_PORT), between=between)

    def redis_host(self, address: str) -> str:
        return next(name for name, a in REDIS_HOSTS.items() if a == address)

    # ----------------------------------------------------------------- websocket hosts

    def start_websocket_hosts(self, project: Any, *, tag: str = "", **extra: str) -> None:
        """On ws1 and ws2: a front and a websocket instance each, on the Cluster
        (their files under ``<tmp>/<host><tag>``)."""
        for name, address in WEBSOCKET_HOSTS.items():
            host = self.hosts[name]
            d = self.tmp / f"{name}{tag}"
            d.mkdir()
            self.stacks[name] = start_stack(
                "offload",
                project,
                d,
                host=address,
                port=HTTP_PORT,
                wrap=host.command(),
                reachable=lambda port, a=address: self.hosts["client"].reachable(a, port),
                DJANGO_WS_REDIS_URL=self.cluster_url,
                DJANGO_ALLOWED_HOSTS=",".join(WEBSOCKET_HOSTS.values()),
                **extra,
            )
            host.procs.extend(self.stacks[name].procs)

    def stop_websocket_hosts(self) -> None:
        for name, stack in self.stacks.items():
            for proc in stack.procs:
                stop(proc)
                self.hosts[name].procs.remove(proc)
        self.stacks.clear()


def remove_stale() -> None:
    """Delete the namespaces of earlier beds whose test process is gone."""
    out = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=20).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and parts[1].isdigit():
            if not os.path.exists(f"/proc/{parts[1]}"):
                subprocess.run([IP, "netns", "del", name], capture_output=True, timeout=20)


def main(argv: list[str]) -> int:
    """Build the bed by hand (``scripts/cluster-lab.sh``); ``clean`` removes stale beds."""
    import secrets
    import tempfile

    from tests.conftest import EXAMPLE, Project

    reason = available()
    if reason:
        print(f"cannot build the bed: {reason}", file=sys.stderr)
        return 1
    if argv[:1] == ["clean"]:
        remove_stale()
        return 0
    # SIGTERM tears down as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="dwslab-"))
    with Lab(tmp) as lab:
        lab.start_cluster()
        env = {
            "DJANGO_SETTINGS_MODULE": "chat.settings",
            "EXAMPLE_DB": str(tmp / "db.sqlite3"),
            "DJANGO_WS_SECRET": secrets.token_hex(32),
            "DJANGO_WS_PUBLISH_COMMAND": "SPUBLISH",
        }
        migrate = [sys.executable, "manage.py", "migrate", "--verbosity", "0"]
        subprocess.run(migrate, cwd=EXAMPLE, env={**os.environ, **env}, check=True, timeout=120)
        lab.start_websocket_hosts(Project(env=env), DJANGO_WS_PUBLISH_COMMAND="SPUBLISH")
        print(f"Redis Cluster (sharded pub/sub): {lab.cluster_url}")
        for name, host in lab.hosts.items():
            print(f"  {name:7} {host.address:12} ip netns exec {host.namespace} <command>")
        for name, stack in lab.stacks.items():
            print(f"  the example chat on {name}: {stack.http('/')} (from the client host); log {stack.log}")
        print("Ctrl-C tears everything down.")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
