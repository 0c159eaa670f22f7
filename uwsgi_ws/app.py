"""The WSGI application of the websocket instance (uWSGI with the gevent loop).

It never imports Django. Django authenticated the client, decided what it may do and
signed that as a ticket; uWSGI forwarded the connection here together with the
ticket (``uwsgi.add_var``). This application checks the ticket, completes the
websocket handshake with uWSGI's native API and serves the session.

Run it with (uwsgi.ini.example's ``[websocket]`` section does)::

    DJANGO_WS_SECRET=... uwsgi --socket /run/myproject/ws.sock --gevent 10000 \\
        --gevent-early-monkey-patch --need-app --module 'uwsgi_ws.app:load()'

``load()`` checks the configuration when uWSGI starts, before any worker exists, and
stops the instance with a non-zero status if it cannot work.
"""

from __future__ import annotations

import gc
import hmac
import logging
import os
import random
import signal
import threading
import socket
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .config import Config, check_socket_directory, unix_socket_path
from .control import Controller
from .exceptions import BadRequest, ConfigurationError, RedisUnavailable, TicketError
from .hub import Hub, connection_factory, make_hub
from .ops import TOP_CHANNELS, TTL_INTERVALS, Registry, Stats, drain_schedule, merge_snapshots, render_metrics
from .presence import PresenceTracker
from .protocol import SSE_HEADERS, Ticket, check_handshake, nonce_key, verify_ticket
from .redis_url import make_client
from .session import EventStreamSession, Session
from .shards import ShardedHub
from .store import Store
from .transport import GeventSocketTransport, Transport

logger = logging.getLogger(__name__)

TICKET_VAR = "DJANGO_WS_TICKET"
# In-process servers (the development server) put a callable here: given the
# handshake key, it answers the handshake itself and returns the connection's
# transport. Without it, uWSGI's native handshake is used.
ACCEPT_KEY = "django_ws.accept"
# The same for event streams: given the response headers, it sends them.
ACCEPT_STREAM_KEY = "django_ws.accept_stream"

StartResponse = Callable[..., Any]

# A full garbage collection scans every tracked object: with 10,000 sessions in a
# worker that stalls every delivery for 100-300 ms, again and again while connections
# arrive. So each new connection first moves everything alive (gc.freeze) out of the
# collector's reach; automatic collections then only look at young objects. Ended
# sessions are freed by reference counting (they leave no reference cycles behind),
# and a full collection over everything runs this often (seconds), for anything else.
FULL_COLLECTION_INTERVAL = 3600.0

# The operations endpoints, answered only to requests without a ticket (from the
# instance's operations HTTP socket, DJANGO_WS_OPS_HTTP, or the hand-over socket).
LIVE_PATH = "/health/live"
READY_PATH = "/health/ready"
METRICS_PATH = "/metrics"
OPS_PATHS = frozenset({LIVE_PATH, READY_PATH, METRICS_PATH})
# A drain ordered through Redis waits this many heartbeat intervals (and this
# much more, for the fronts' cached view of the registry) before closing anything:
# the fronts stop handing connections over first.
DRAIN_SETTLE_INTERVALS = 2.0
DRAIN_SETTLE_EXTRA = 0.5


class WebSocketApplication:
    """Serve handed-over websocket connections.

    Args:
        config: the instance configuration; read from the environment on first use
            when omitted.
    """

    def __init__(self, config: Config | None = None) -> None:
        self._config = config
        self._hub: Hub | ShardedHub | None = None
        self._store: Store | None = None
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self._runtime_lock = threading.Lock()
        self._controllers: dict[str, Controller] = {}
        self._trackers: dict[str, PresenceTracker] = {}
        self._stats: Stats | None = None
        self._registry: Registry | None = None
        self._worker_started = False
        self._started = time.time()
        self.address = ""
        # Draining: not ready (the fronts stop handing over); refusing: new
        # connections are answered 503.
        self._draining = False
        self._refusing = False
        self._drain_order: float | None = None
        self._redis_ok = False
        self._beat_wakeup: Any = None
        self._background: list[Any] = []  # greenlets and watchers that outlive requests
        self._uwsgi_reload = False  # SIGHUP is answered here: drain, then end the worker
        self._leaving = False  # reloaded and drained: no more heartbeats
        self._reloading = False

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = Config.from_env()
        return self._config

    def _runtime(self) -> tuple[Hub | ShardedHub, Store]:
        # Built on first use, so inside the worker process after uWSGI forked it.
        hub, store = self._hub, self._store
        if hub is not None and store is not None:
            return hub, store
        # Once: making a Cluster client talks to the nodes, and the connections that
        # arrive meanwhile must not each build a Hub of their own.
        with self._runtime_lock:
            return self._build_runtime()

    def _build_runtime(self) -> tuple[Hub, Store]:
        if self._hub is None or self._store is None:
            config = self.config
            client = make_client(
                config.redis_url,
                max_connections=config.pool_size,
                wait=config.subscribe_timeout,
                socket_timeout=10.0,
                socket_connect_timeout=5.0,
                health_check_interval=30,
                client_name=f"django_ws:pool:{os.getpid()}",
            )
            sub = "SSUBSCRIBE" if config.publish_command == "SPUBLISH" else "SUBSCRIBE"
            self._store = Store(client, publish_command=config.publish_command)
            if config.metrics and self._stats is None:
                self._stats = Stats()
            self._hub = make_hub(
                config.redis_url, subscribe_command=sub, store=self._store, ping_interval=10.0, stats=self._stats
            )
            self._hub.start()
        return self._hub, self._store

    def controller(self, prefix: str) -> Controller:
        """Return this worker's controller for the project with Redis ``prefix``."""
        controller = self._controllers.get(prefix)
        if controller is None:
            hub, store = self._runtime()
            controller = self._controllers.setdefault(
                prefix, Controller(prefix, hub, store, clock_skew=self.config.clock_skew)
            )
        return controller

    def presence(self, prefix: str) -> PresenceTracker:
        """Return this worker's presence tracker for the project with Redis ``prefix``."""
        tracker = self._trackers.get(prefix)
        if tracker is None:
            _, store = self._runtime()
            tracker = self._trackers.setdefault(
                prefix, PresenceTracker(store.client, prefix, publish_command=self.config.publish_command)
            )
        return tracker

    def going_away(self, *args: Any) -> None:
        """Close every connection of this worker with 1012 (service restart).

        Called when uWSGI reloads the worker gracefully: clients reconnect (to the
        new worker) and recover, instead of holding the old one for its whole
        reload mercy.
        """
        sessions = list(self._sessions)
        if sessions:
            logger.info("worker %d going away: closing %d connection(s)", os.getpid(), len(sessions))
        for session in sessions:
            session.going_away()

    def _start_worker_watchers(self) -> None:
        """Once per gevent worker: graceful reloads, the garbage collection policy, and
        the heartbeat in the instance registry."""
        import signal

        import gevent

        if self._worker_started:
            return
        self._worker_started = True
        self._background = [gevent.spawn(self._collect_forever)]
        if self.address:
            gevent.spawn_later(0.5, self._own_sighup)
        else:
            self._background.append(gevent.signal_handler(signal.SIGHUP, self.reloading))
        if self.config.registry_interval > 0 and self.address:
            self._runtime()  # the Hub connects now: readiness needs it
            self._background.append(gevent.spawn(self._beat_forever))

    def worker_started(self) -> None:
        """uWSGI forked this worker: start the Hub, the watchers and the heartbeat."""
        try:
            config = self.config
        except ConfigurationError:
            return  # load() refused it already
        if not self._gevent_patched():
            return
        self.address = config.address or next(iter(_uwsgi_sockets()), "")
        self._started = time.time()
        self._start_worker_watchers()

    # ----------------------------------------------------------------- registry

    @property
    def ready(self) -> bool:
        """This worker takes connections: Redis answers, the Hub is subscribed, no drain."""
        return (
            not self._draining and self._hub is not None and self._hub.connected and self._redis_ok
        )

    def worker_name(self) -> str:
        return f"{self.address} {socket.gethostname()} {os.getpid()}"

    def snapshot(self) -> dict[str, Any]:
        """This worker's figures and state, as the registry and the metrics show them."""
        websockets = streams = queued = 0
        for session in list(self._sessions):
            if isinstance(session, EventStreamSession):
                streams += 1
            else:
                websockets += 1
            queued += session.transport.queued_bytes
        hub = self._hub
        stats = self._stats
        return {
            "address": self.address,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self._started,
            "at": time.time(),
            "ready": self.ready,
            "draining": self._draining,
            "ops": self.config.ops_address,
            "connections": {"websocket": websockets, "eventstream": streams},
            "subscriptions": 0 if hub is None else hub.subscriptions(),
            "channels": 0 if hub is None else hub.channel_count,
            "top": [] if hub is None else [list(item) for item in hub.busiest(TOP_CHANNELS)],
            "queue_bytes": queued,
            "redis_reconnects": 0 if hub is None else hub.reconnects,
            "redis_errors": 0 if hub is None else hub.errors,
            "stats": (stats or Stats()).as_dict(),
        }

    def _registry_client(self) -> Registry:
        if self._registry is None:
            _, store = self._runtime()
            self._registry = Registry(store.client, self.config.prefix)
        return self._registry

    def beat(self) -> None:
        """Write this worker's entry in the registry and follow a drain order."""
        from redis.exceptions import RedisError

        config = self.config
        if self._leaving:
            return
        self._own_sighup()
        registry = self._registry_client()
        try:
            self._redis_ok = True  # as the entry says: it is only read if the write worked
            order = registry.beat(
                self.worker_name(),
                self.snapshot(),
                ttl=config.registry_interval * TTL_INTERVALS,
                drain_of=self.address,
            )
        except RedisError as exc:
            if self._redis_ok:
                logger.warning("could not write to the instance registry: %s", exc)
            self._redis_ok = False
            return
        if order is not None and order > self._started and self._drain_order is None:
            logger.info("drain ordered through Redis for %s", self.address)
            self._drain_order = order
            self.drain(settle=DRAIN_SETTLE_INTERVALS * config.registry_interval + DRAIN_SETTLE_EXTRA)
        elif order is None and self._drain_order is not None:
            logger.info("drain order cancelled: taking connections again")
            self._drain_order = None
            self._draining = self._refusing = False

    def _beat_forever(self) -> None:
        from gevent.event import Event

        self._beat_wakeup = Event()
        while True:
            try:
                self.beat()
            except Exception:
                logger.exception("the registry heartbeat failed")
            self._beat_wakeup.wait(self.config.registry_interval)
            self._beat_wakeup.clear()

    def _beat_soon(self) -> None:
        if self._beat_wakeup is not None:
            self._beat_wakeup.set()

    # ----------------------------------------------------------------- drain

    def _own_sighup(self) -> None:
        """Answer SIGHUP (uWSGI's reload of this worker) with a drain, then end the worker.

        uWSGI 2.0's own handler stops accepting and waits for the running requests,
        that is for every connection, until ``worker-reload-mercy`` runs out. So the
        signal gets a Python handler instead, set once the worker's loop runs (uWSGI
        sets its own until then) and set again at each connection and heartbeat if it
        was replaced; the drain ends the worker itself, as uWSGI's reload expects.
        """
        if self.address and signal.getsignal(signal.SIGHUP) != self._sighup:
            signal.signal(signal.SIGHUP, self._sighup)
            self._uwsgi_reload = True

    def _sighup(self, signum: int, frame: Any) -> None:
        import gevent

        gevent.spawn(self.reloading)

    def reloading(self, *args: Any) -> None:
        """SIGHUP (uWSGI reloads the worker): drain, then end the worker.

        In an instance started by :func:`load` the drain is spread over
        ``DJANGO_WS_DRAIN_WINDOW``; elsewhere (single-instance mode, where uWSGI ends
        the worker right after this) every connection is closed at once, with 1012.
        """
        if not self._uwsgi_reload or self.config.drain_window <= 0:
            self.going_away()
            return
        self.drain(settle=0.0, reload=True)

    def drain(self, *, settle: float, reload: bool = False) -> None:
        """Stop taking connections, then close every one with 1012 over the drain window.

        The registry shows this worker not ready at once, so the fronts hand new
        connections to other instances; after ``settle`` seconds new connections
        are refused (503) and the open ones are closed one by one, each at a random
        point of its own slot of ``DJANGO_WS_DRAIN_WINDOW`` (:func:`drain_schedule`):
        their clients reconnect elsewhere at a bounded rate. With ``reload``, the
        worker then leaves the registry and ends (uWSGI starts a new one).
        """
        import gevent

        if self._reloading or (self._draining and not reload):
            return
        self._reloading = reload
        self._draining = True
        self._beat_soon()
        gevent.spawn(self._drain_then_leave if reload else self._drain, settle)

    def _drain_then_leave(self, settle: float) -> None:
        import gevent
        from redis.exceptions import RedisError

        from .session import DRAIN_TIMEOUT, LINGER_TIMEOUT

        self._drain(settle)
        deadline = time.monotonic() + DRAIN_TIMEOUT + LINGER_TIMEOUT + 1.0
        while self._sessions and time.monotonic() < deadline:
            gevent.sleep(0.05)
        self._leaving = True
        if self._registry is not None:
            try:
                self._registry.leave(self.worker_name())
            except RedisError:
                pass
        logger.info("worker %d drained: ending it for the reload", os.getpid())
        os._exit(UWSGI_RELOAD_CODE)

    def _drain(self, settle: float) -> None:
        import gevent

        if settle > 0:
            gevent.sleep(settle)
        if not self._draining:
            return  # cancelled meanwhile
        self._refusing = True
        sessions = list(self._sessions)
        random.shuffle(sessions)
        window = self.config.drain_window
        logger.info("worker %d draining: closing %d connection(s) over %.1fs", os.getpid(), len(sessions), window)
        started = time.monotonic()
        for at, session in zip(drain_schedule(len(sessions), window), sessions, strict=True):
            delay = started + at - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            if not self._draining:
                return
            session.going_away()

    # ----------------------------------------------------------------- operations endpoints

    def _ops(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _answer(start_response, 405, "use GET")
        if path == LIVE_PATH:
            return _answer(start_response, 200, "live")
        if path == READY_PATH:
            return self._readiness(start_response)
        return self._metrics(start_response)

    def _readiness(self, start_response: StartResponse) -> Iterable[bytes]:
        from redis.exceptions import RedisError

        if self._draining:
            return _answer(start_response, 503, "draining")
        try:
            hub, store = self._runtime()
            store.client.ping()
        except (RedisError, ConfigurationError):
            return _answer(start_response, 503, "redis unreachable")
        if not hub.connected:
            return _answer(start_response, 503, "hub not subscribed")
        return _answer(start_response, 200, "ready")

    def _metrics(self, start_response: StartResponse) -> Iterable[bytes]:
        from redis.exceptions import RedisError

        mine = self.snapshot()
        snapshots = [mine]
        if self.config.registry_interval > 0 and self.address:
            try:
                others = self._registry_client().workers()
            except RedisError as exc:
                logger.warning("metrics of this worker only: cannot read the registry (%s)", exc)
                others = []
            me = self.worker_name()
            snapshots += [w for w in others if w.get("address") == self.address and w.get("name") != me]
        try:
            body, content_type = render_metrics(merge_snapshots(snapshots))
        except ImportError:
            return _answer(start_response, 501, "metrics need prometheus_client (pip install prometheus-client)")
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    def _collect_forever(self) -> None:
        """Reclaim what the frozen objects hold, once every FULL_COLLECTION_INTERVAL."""
        import gevent

        while True:
            gevent.sleep(FULL_COLLECTION_INTERVAL)
            started = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            gc.freeze()
            logger.info(
                "full garbage collection with %d connection(s): %d unreachable objects in %.0f ms",
                len(self._sessions),
                found,
                (time.perf_counter() - started) * 1000,
            )

    def close(self) -> None:
        """Stop the Hub and close the Redis connections (for servers that stop)."""
        if self._hub is not None:
            self._hub.stop()
        if self._store is not None:
            self._store.client.close()
        for tracker in self._trackers.values():
            tracker.stop()
        self._hub = self._store = None
        self._controllers.clear()
        self._trackers.clear()

    @staticmethod
    def _gevent_patched() -> bool:
        from gevent import monkey

        if monkey.is_module_patched("socket") and monkey.is_module_patched("threading"):
            return True
        logger.error(
            "the websocket instance needs gevent's monkey patching: start uWSGI with "
            "--gevent-early-monkey-patch (or gevent-monkey-patch = true)"
        )
        return False

    def _refuse(self, reason: str) -> None:
        if self._stats is not None:
            self._stats.refuse(reason)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if TICKET_VAR not in environ and environ.get("PATH_INFO") in OPS_PATHS:
            return self._ops(environ, start_response)
        try:
            config = self.config
        except ConfigurationError as exc:
            logger.error("websocket instance misconfigured: %s", exc)
            return _answer(start_response, 500, "server misconfigured")
        try:
            ticket = verify_ticket(environ.get(TICKET_VAR), config.secret, leeway=config.clock_skew)
            if ticket.stream:
                if environ.get("REQUEST_METHOD") != "GET":
                    raise BadRequest("event streams use GET", status=405)
                key = ""
            else:
                key = check_handshake(environ.get("REQUEST_METHOD", ""), environ)
            # The ticket was made for one handshake: another connection that got hold
            # of it (a log, a proxy, a race) cannot use it with a key of its own.
            if not hmac.compare_digest(ticket.key.encode("ascii", "replace"), key.encode("ascii")):
                raise TicketError("ticket made for another handshake")
        except TicketError as exc:
            logger.warning("refused connection from %s: %s", environ.get("REMOTE_ADDR", "?"), exc.reason)
            self._refuse("ticket")
            return _answer(start_response, 403, "forbidden")
        except BadRequest as exc:
            self._refuse("bad_request")
            return _answer(start_response, exc.status, exc.message)
        if self._refusing:
            self._refuse("draining")
            return _answer(start_response, 503, "service restarting: try another instance")
        in_process = environ.get(ACCEPT_STREAM_KEY if ticket.stream else ACCEPT_KEY) is not None
        if not in_process:
            if not self._gevent_patched():
                return _answer(start_response, 500, "server misconfigured")
            self._start_worker_watchers()
            self._own_sighup()
        refusal = self._claim(ticket, environ, config)
        if refusal is not None:
            status, text = refusal
            return _answer(start_response, status, text)
        if ticket.stream:
            return self._stream(ticket, environ, start_response)
        accept = environ.get(ACCEPT_KEY)
        transport: Transport
        if accept is not None:
            transport = accept(key)
        else:
            import uwsgi

            try:
                uwsgi.websocket_handshake(key)
            except OSError:
                logger.warning("websocket handshake failed for %s", ticket.identity)
                self._refuse("handshake")
                return []
            transport = GeventSocketTransport(uwsgi.connection_fd())
        self._serve(Session, ticket, transport)
        return []

    def _claim(self, ticket: Ticket, environ: dict[str, Any], config: Config) -> tuple[int, str] | None:
        """Use the ticket up: return None, or the status and text refusing the request."""
        _, store = self._runtime()  # before the handshake: a Redis problem is then a clean error
        lifetime = ticket.expires - time.time() + config.clock_skew  # the mark outlives the ticket
        try:
            fresh = store.claim(nonce_key(ticket.prefix, ticket.nonce), lifetime)
        except RedisUnavailable as exc:
            logger.warning("refused connection of %s: %s", ticket.identity, exc)
            self._refuse("redis")
            return 503, "service unavailable: try again"
        if not fresh:
            self._refuse("ticket_reused")
            logger.warning(
                "refused a ticket used before, for %s from %s", ticket.identity, environ.get("REMOTE_ADDR", "?")
            )
            return 403, "forbidden"
        return None

    def _serve(self, session_class: type[Session], ticket: Ticket, transport: Transport) -> None:
        hub, store = self._runtime()
        if getattr(transport, "cooperative", False):
            # Everything alive now (the other sessions) leaves the collector's reach:
            # see FULL_COLLECTION_INTERVAL.
            gc.freeze()
        session = session_class(
            ticket,
            transport,
            hub,
            store,
            subscribe_timeout=self.config.subscribe_timeout,
            controller=self.controller(ticket.prefix),
            presence=self.presence(ticket.prefix) if ticket.presence else None,
            stats=self._stats,
        )
        if self._stats is not None:
            self._stats.handshakes += 1
        self._sessions.add(session)
        try:
            session.run()
        finally:
            self._sessions.discard(session)

    def _stream(self, ticket: Ticket, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Serve a Server-Sent Events stream."""
        accept_stream = environ.get(ACCEPT_STREAM_KEY)
        if accept_stream is not None:
            self._serve(EventStreamSession, ticket, accept_stream(SSE_HEADERS))
            return []
        if not self._gevent_patched():
            return _answer(start_response, 500, "server misconfigured")
        self._start_worker_watchers()
        self._own_sighup()
        start_response("200 OK", list(SSE_HEADERS))

        def body() -> Iterator[bytes]:
            # uWSGI writes the headers and this first chunk before the generator goes
            # on; from then on the session writes to the socket itself.
            yield b"retry: 2000\n\n"
            import uwsgi

            self._serve(EventStreamSession, ticket, GeventSocketTransport(uwsgi.connection_fd()))

        return body()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


def _answer(start_response: StartResponse, status: int, text: str) -> list[bytes]:
    body = (text + "\n").encode("utf-8")
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    if status == 426:
        # No "Upgrade" header: WSGI forbids hop-by-hop headers in applications.
        headers.append(("Sec-WebSocket-Version", "13"))
    if status == 405:
        headers.append(("Allow", "GET"))
    start_response(f"{status} {_REASONS.get(status, 'Error')}", headers)
    return [body]


# The status uWSGI's workers end with when they are reloaded.
UWSGI_RELOAD_CODE = 17
# The status of a websocket instance that refused its configuration: uWSGI's own
# "no application could be loaded" code, so that uWSGI and supervisors read it alike.
EXIT_REFUSED = 22
# Set by uwsgi.ini.example for the websocket instance its front starts: the front
# master's pid (see _stop_front).
FRONT_PID_VAR = "DJANGO_WS_FRONT_PID"


def load() -> WebSocketApplication:
    """Return the application of a websocket instance, or refuse to start.

    uWSGI calls it once, when the instance starts (``module = uwsgi_ws.app:load()``),
    before any worker exists. A configuration that cannot work (no or a weak
    ``DJANGO_WS_SECRET``, a bad number or Redis URL, a unix socket in a directory
    other users may enter or change) is logged as one line, and the process ends with
    status :data:`EXIT_REFUSED` at once, without a traceback: an instance that
    answered every connection with an error would look alive to its supervisor.

    Raises:
        SystemExit: the configuration was refused (which ends uWSGI's master).
    """
    try:
        config = Config.from_env()
        for address in _uwsgi_sockets():
            path = unix_socket_path(address)
            if path is not None:
                check_socket_directory(path, name=f"socket {path}")
    except ConfigurationError as exc:
        logger.critical("websocket instance not started: %s", exc)
        _stop_front()
        raise SystemExit(EXIT_REFUSED) from None
    app = WebSocketApplication(config)
    try:
        import uwsgi
    except ImportError:
        return app
    # Each worker registers and connects its Hub as soon as it exists, not at its
    # first connection: until then nobody would know it is ready.
    uwsgi.post_fork_hook = app.worker_started
    return app


def _uwsgi_sockets() -> list[str]:
    """The addresses this uWSGI instance listens on (none outside uWSGI)."""
    try:
        import uwsgi
    except ImportError:
        return []
    addresses: list[str] = []
    for option in ("socket", "uwsgi-socket"):
        value = uwsgi.opt.get(option)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bytes):
                addresses.append(item.decode("utf-8", "replace"))
            elif isinstance(item, str):
                addresses.append(item)
    return addresses


def _stop_front() -> None:
    """Stop the front uWSGI that started this instance, when it asked for that.

    The front of uwsgi.ini.example starts the websocket instance as an attached
    daemon, and uWSGI starts a daemon that exits again, forever, while the front
    goes on serving pages that can never get a websocket. A refused configuration
    is refused again on every attempt, so the front is stopped instead. Only this
    process's parent is signalled, so a stale or inherited value reaches no other.
    """
    raw = os.environ.get(FRONT_PID_VAR, "")
    if not raw.isdigit() or int(raw) != os.getppid():
        return
    logger.critical("stopping the front instance (pid %s) too: it could not hand websockets over", raw)
    try:
        os.kill(int(raw), signal.SIGINT)
    except OSError as exc:
        logger.error("could not stop the front instance (pid %s): %s", raw, exc.strerror)
