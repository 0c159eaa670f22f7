"""Which websocket instance gets the next hand-over.

With a static ``OFFLOAD_TO`` list, each address in turn (round robin). With
``OFFLOAD_REGISTRY``, the front reads the instance registry in Redis (at most every
``REFRESH`` seconds per process) and hands each websocket to the ready instance with
the fewest connections among those of ``OFFLOAD_TO``, counting its own hand-overs since
the last read. Only addresses listed in ``OFFLOAD_TO`` are ever used: the registry
says which are alive and how loaded, never where a connection (with its cookies and
ticket) may go, so that whoever can write to Redis cannot send hand-overs elsewhere.

Before a hand-over the chosen address is probed (a connect, then close), at most once
every ``PROBE_OK_FOR`` seconds per address: an instance killed a moment ago still has
a fresh registry entry, but refuses connections at once. A refused address is
skipped for ``DEAD_FOR`` seconds. Without the registry (Redis unreachable, or no
instance of the list registered), the static round robin goes on, with the same
probes.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from uwsgi_ws.config import unix_socket_path
from uwsgi_ws.ops import Instance, Registry, choose_instance

logger = logging.getLogger(__name__)

REFRESH = 0.5  # seconds between two reads of the registry, per process
PROBE_OK_FOR = 0.2  # seconds a successful probe of an address is trusted
DEAD_FOR = 2.0  # seconds a refused address is skipped
PROBE_TIMEOUT = 0.25


def probe(address: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Tell whether something accepts connections at a uWSGI socket address."""
    path = unix_socket_path(address)
    try:
        if path is not None:
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(timeout)
                conn.connect(path)
        elif address.startswith("@"):
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(timeout)
                conn.connect("\0" + address[1:])
        else:
            host, _, port = address.rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
    except (OSError, ValueError):
        return False
    return True


class Chooser:
    """Choose instances for one process's hand-overs (thread-safe).

    Args:
        read: returns the registry's instances (may raise redis errors).
        probe: tells whether an address accepts connections.
        clock: monotonic clock.
    """

    def __init__(
        self,
        read: Callable[[], list[Instance]],
        *,
        probe: Callable[[str], bool] = probe,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._probe = probe
        self._clock = clock
        self._lock = threading.Lock()
        self._instances: list[Instance] = []
        self._read_at = float("-inf")
        self._pending: dict[str, int] = {}
        self._dead: dict[str, float] = {}
        self._alive: dict[str, float] = {}
        self._turn = 0
        self._warned = False

    def choose(self, addresses: Sequence[str], *, registry: bool) -> str:
        """Return the address for the next hand-over among ``addresses``."""
        now = self._clock()
        with self._lock:
            if registry and now - self._read_at >= REFRESH:
                self._refresh(now)
            allowed = set(addresses)
            if registry:
                candidates = [
                    i for i in self._instances if i.address in allowed and self._dead.get(i.address, 0.0) <= now
                ]
                while candidates:
                    pick = choose_instance(candidates, pending=self._pending)
                    if pick is None:
                        break
                    if self._usable(pick.address, now):
                        self._pending[pick.address] = self._pending.get(pick.address, 0) + 1
                        return pick.address
                    candidates = [i for i in candidates if i.address != pick.address]
            # The static list, in turn, skipping what was refused a moment ago.
            for _ in range(len(addresses)):
                address = addresses[self._turn % len(addresses)]
                self._turn += 1
                if len(addresses) == 1 or (self._dead.get(address, 0.0) <= now and self._usable(address, now)):
                    return address
            address = addresses[self._turn % len(addresses)]
            self._turn += 1
            return address

    def _usable(self, address: str, now: float) -> bool:
        if self._alive.get(address, float("-inf")) + PROBE_OK_FOR > now:
            return True
        if self._probe(address):
            self._alive[address] = now
            return True
        logger.warning("websocket instance %s refuses connections: skipped for %.0fs", address, DEAD_FOR)
        self._dead[address] = now + DEAD_FOR
        self._alive.pop(address, None)
        return False

    def _refresh(self, now: float) -> None:
        from redis.exceptions import RedisError

        self._read_at = now
        self._pending.clear()
        try:
            self._instances = self._read()
            self._warned = False
        except RedisError as exc:
            if not self._warned:
                logger.warning("cannot read the instance registry (%s): handing over in turn", exc)
                self._warned = True
            self._instances = []


_choosers: dict[tuple[str, str], Chooser] = {}
_choosers_lock = threading.Lock()


def next_address(conf: Any) -> str:
    """The websocket instance for this hand-over, as the settings ``conf`` say."""
    addresses: tuple[str, ...] = conf.offload_to
    if not conf.offload_registry and len(addresses) == 1:
        return addresses[0]
    key = (conf.redis_url, conf.prefix)
    chooser = _choosers.get(key)
    if chooser is None:
        with _choosers_lock:
            chooser = _choosers.get(key)
            if chooser is None:
                chooser = _choosers[key] = Chooser(_registry_reader(conf.prefix))
    return chooser.choose(addresses, registry=conf.offload_registry)


def _registry_reader(prefix: str) -> Callable[[], list[Instance]]:
    def read() -> list[Instance]:
        from .publishing import get_redis

        return Registry(get_redis(), prefix).instances()

    return read
