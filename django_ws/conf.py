"""Settings of the Django side: one accessor, every default in one place.

``settings.WEBSOCKET_URL`` is the URL prefix of websocket endpoints; everything else
lives in the ``settings.DJANGO_WS`` dict. :func:`get_settings` validates them and
raises ImproperlyConfigured naming the bad setting; the system checks call it too.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from uwsgi_ws.config import DEFAULT_REDIS_URL, check_secret, check_socket_directory, unix_socket_path
from uwsgi_ws.exceptions import BadRequest, ConfigurationError
from uwsgi_ws.protocol import Limits, validate_facility, validate_prefix
from uwsgi_ws.redis_url import check_publish_command, check_url

from .origins import Origin, OriginPattern, parse_origin_pattern

DEFAULTS: dict[str, Any] = {
    # Where Redis is. Default: $DJANGO_WS_REDIS_URL, else the local server.
    "REDIS_URL": None,
    # First part of every Redis key and channel name; change it to share a Redis.
    "PREFIX": "ws",
    # Messages kept per channel for recovery, and seconds they are kept after the
    # channel's last message. 0 disables history (and therefore recovery).
    "HISTORY_SIZE": 100,
    "HISTORY_TTL": 900,
    # Bytes of history kept per channel (the oldest go first); None: no byte cap.
    "HISTORY_MAX_BYTES": 1 << 20,
    # Seconds between server heartbeats (a ping and a heartbeat frame).
    "HEARTBEAT": 20,
    # Origins allowed besides the request's own and CSRF_TRUSTED_ORIGINS
    # ("https://example.com", "https://*.example.com", or "*" for any).
    "ALLOWED_ORIGINS": None,
    # Accept requests without an Origin header (non-browser clients send none).
    "ALLOW_MISSING_ORIGIN": True,
    # Facility names allowed, or glob patterns of them ("room-*"); None allows any
    # valid name.
    "FACILITIES": None,
    # Dotted path to the authorization hook, see django_ws.auth.
    "AUTHORIZE": "django_ws.auth.default_authorize",
    # Audiences an authenticated client may publish to under the default hook.
    "CLIENT_PUBLISH": (),
    # Largest message a client may send, in bytes.
    "MAX_MESSAGE_SIZE": 65536,
    # Client publishes: messages per second and burst size (POSTs: per client, in
    # Redis, across processes and instances; websocket frames: per connection).
    "RATE_LIMIT": (10, 20),
    # Slow consumers: a connection whose unsent data exceeds either bound is closed.
    "SEND_QUEUE_MESSAGES": 1000,
    "SEND_QUEUE_BYTES": 1 << 20,
    # Secret shared with the websocket instance. Default: $DJANGO_WS_SECRET. Required
    # when offloading; otherwise (tickets never leave the process) a random one.
    "TICKET_SECRET": None,
    # publish(): attempts after a failure to reach Redis, and the first pause between
    # them (doubling each time). A retried message may arrive twice if Redis took it
    # but its answer was lost; 0 retries (the default) never duplicates.
    "PUBLISH_RETRIES": 0,
    "PUBLISH_RETRY_DELAY": 0.1,
    # Seconds a hand-over ticket stays valid.
    "TICKET_TTL": 15,
    # uWSGI socket of the websocket instance ("127.0.0.1:8001" or a unix path), or a
    # list of them (or a comma-separated string): hand-overs then go to each in turn.
    # Default: $DJANGO_WS_OFFLOAD_TO. None: no offloading (single-instance mode).
    "OFFLOAD_TO": None,
    # Choose among OFFLOAD_TO's instances with the instance registry in Redis: each
    # hand-over goes to the ready instance with the fewest connections, and a dead or
    # draining one is skipped. Default: $DJANGO_WS_OFFLOAD_REGISTRY ("1"), else False.
    "OFFLOAD_REGISTRY": None,
    # Close the websockets of a session when it ends: on logout (user_logged_out) and
    # when a view flushes the session or changes its key (login does).
    "DISCONNECT_ON_LOGOUT": True,
    # Seconds after which a connection is closed (code 4010) so that its client
    # reconnects and is authorized again with its current rights; None: never.
    "MAX_CONNECTION_AGE": None,
    # When a user leaves a group (User.groups, m2m_changed), end that group's
    # subscriptions of the user's open connections (django_ws.unsubscribe).
    "UNSUBSCRIBE_ON_GROUP_REMOVAL": True,
    # Presence: list each connection under its user (anonymous ones are counted) in
    # the broadcast, user and group channels it subscribes to.
    "PRESENCE": True,
    # Seconds within which the entries of a websocket worker that died expire.
    "PRESENCE_TTL": 30,
    # Dotted path to a hook (request) -> small JSON object shown with the member.
    "PRESENCE_INFO": None,
    # Facilities (names or glob patterns) whose subscribers get join/leave events
    # without asking with ?presence.
    "PRESENCE_EVENTS": (),
    # Presence changes kept in the stream read by `manage.py ws_events`; 0: none.
    "PRESENCE_STREAM_SIZE": 10000,
    # "PUBLISH", or "SPUBLISH" (sharded pub/sub, Redis 7): must match the websocket
    # instance's DJANGO_WS_PUBLISH_COMMAND. Default: $DJANGO_WS_PUBLISH_COMMAND, else PUBLISH.
    "PUBLISH_COMMAND": None,
}

AUDIENCE_NAMES = ("broadcast", "user", "group", "session")
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Facilities:
    """The allowed facilities: exact names and glob patterns (``in`` tests a name)."""

    names: frozenset[str]
    patterns: tuple[str, ...]
    _matcher: re.Pattern[str] | None

    @classmethod
    def parse(cls, entries: Any) -> Facilities:
        """Read ``FACILITIES``; raise ImproperlyConfigured naming a bad entry."""
        if isinstance(entries, str) or not isinstance(entries, (list, tuple, set, frozenset)):
            raise ImproperlyConfigured(
                "DJANGO_WS['FACILITIES'] must be a list of facility names or glob patterns "
                "(e.g. ['chat', 'room-*']), or None to allow any valid name"
            )
        names, patterns = set(), []
        for entry in entries:
            if not isinstance(entry, str) or not entry:
                raise ImproperlyConfigured(f"DJANGO_WS['FACILITIES']: {entry!r} is not a facility name or pattern")
            if _GLOB_CHARS & set(entry):
                patterns.append(entry)
                continue
            try:
                names.add(validate_facility(entry))
            except BadRequest:
                raise ImproperlyConfigured(
                    f"DJANGO_WS['FACILITIES']: {entry!r} can never be requested: a facility is 1 to 64 "
                    "letters, digits, '_', '-' and '.', starting with a letter or digit, without '..'"
                ) from None
        matcher = re.compile("|".join(fnmatch.translate(p) for p in patterns)) if patterns else None
        return cls(frozenset(names), tuple(patterns), matcher)

    def __contains__(self, facility: object) -> bool:
        if not isinstance(facility, str):
            return False
        return facility in self.names or (self._matcher is not None and self._matcher.match(facility) is not None)


@dataclass(frozen=True)
class WsSettings:
    """Validated settings (see DEFAULTS for what each one means)."""

    url: str
    redis_url: str
    prefix: str
    history_size: int
    history_ttl: float
    history_max_bytes: int  # 0: no byte cap
    heartbeat: float
    allowed_origins: tuple[OriginPattern, ...]  # ALLOWED_ORIGINS and CSRF_TRUSTED_ORIGINS
    allow_missing_origin: bool
    facilities: Facilities | None
    authorize: Callable[..., bool]
    client_publish: frozenset[str]
    max_message_size: int
    rate: float
    burst: int
    queue_messages: int
    queue_bytes: int
    ticket_secret: bytes
    ticket_ttl: float
    offload_to: tuple[str, ...]  # empty: no offloading
    offload_registry: bool
    publish_retries: int
    publish_retry_delay: float
    publish_command: str
    disconnect_on_logout: bool
    max_connection_age: float | None
    unsubscribe_on_group_removal: bool
    presence: bool
    presence_ttl: float
    presence_info: Callable[..., Any] | None
    presence_events: Facilities
    presence_stream_size: int

    def limits(self) -> Limits:
        return Limits(
            max_message_size=self.max_message_size,
            rate=self.rate,
            burst=self.burst,
            queue_messages=self.queue_messages,
            queue_bytes=self.queue_bytes,
            heartbeat=self.heartbeat,
            history_size=self.history_size,
            history_ttl=self.history_ttl,
            history_max_bytes=self.history_max_bytes,
        )

    def origin_allowed(self, origin: Origin) -> bool:
        """Tell whether ``origin`` is listed (the request's own origin is checked apart)."""
        return any(pattern.matches(origin) for pattern in self.allowed_origins)


_cached: WsSettings | None = None


def get_settings() -> WsSettings:
    """Return the validated settings, read once and cached until they change.

    Raises:
        ImproperlyConfigured: a setting has a bad value; the message names it.
    """
    global _cached
    if _cached is None:
        _cached = _read()
    return _cached


@receiver(setting_changed)
def _reset(setting: str, **kwargs: Any) -> None:
    global _cached
    if setting in ("DJANGO_WS", "WEBSOCKET_URL", "SECRET_KEY", "CSRF_TRUSTED_ORIGINS"):
        _cached = None


def _read() -> WsSettings:
    user = getattr(settings, "DJANGO_WS", {})
    if not isinstance(user, dict):
        raise ImproperlyConfigured("DJANGO_WS must be a dict")
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise ImproperlyConfigured(
            f"unknown DJANGO_WS setting(s) {', '.join(unknown)}; known: {', '.join(sorted(DEFAULTS))}"
        )
    s = {**DEFAULTS, **user}

    url = getattr(settings, "WEBSOCKET_URL", "/ws/")
    if not isinstance(url, str) or not url.startswith("/") or not url.endswith("/"):
        raise ImproperlyConfigured(f"WEBSOCKET_URL must start and end with '/', not {url!r}")

    redis_url = s["REDIS_URL"] or os.environ.get("DJANGO_WS_REDIS_URL") or DEFAULT_REDIS_URL
    try:
        check_url(redis_url if isinstance(redis_url, str) else "")
    except ConfigurationError as exc:
        raise ImproperlyConfigured(f"DJANGO_WS['REDIS_URL']: {exc}") from None
    try:
        prefix = validate_prefix(s["PREFIX"])
    except ValueError as exc:
        raise ImproperlyConfigured(f"DJANGO_WS['PREFIX']: {exc}") from None

    origins = _origin_patterns(s["ALLOWED_ORIGINS"], "DJANGO_WS['ALLOWED_ORIGINS']", any_allowed=True)
    origins += _origin_patterns(getattr(settings, "CSRF_TRUSTED_ORIGINS", None), "CSRF_TRUSTED_ORIGINS")

    facilities = None if s["FACILITIES"] is None else Facilities.parse(s["FACILITIES"])

    hook = s["AUTHORIZE"]
    if isinstance(hook, str):
        try:
            hook = import_string(hook)
        except ImportError as exc:
            raise ImproperlyConfigured(f"DJANGO_WS['AUTHORIZE']: cannot import {s['AUTHORIZE']!r} ({exc})") from None
    if not callable(hook):
        raise ImproperlyConfigured("DJANGO_WS['AUTHORIZE'] must be a callable or its dotted path")

    client_publish = s["CLIENT_PUBLISH"]
    if isinstance(client_publish, str) or not set(client_publish) <= set(AUDIENCE_NAMES):
        raise ImproperlyConfigured(
            f"DJANGO_WS['CLIENT_PUBLISH'] must be a list drawn from {AUDIENCE_NAMES}, not {client_publish!r}"
        )

    rate = s["RATE_LIMIT"]
    if not (
        isinstance(rate, (tuple, list))
        and len(rate) == 2
        and all(_number(x) and x >= 0 for x in rate)
        and (rate[0] == 0 or rate[1] >= 1)
    ):
        raise ImproperlyConfigured(
            "DJANGO_WS['RATE_LIMIT'] must be (messages per second, burst), e.g. (10, 20), with a burst of at "
            f"least 1; (0, 0) disables the limit; not {rate!r}"
        )
    history_max_bytes = s["HISTORY_MAX_BYTES"]
    if history_max_bytes is None:
        history_max_bytes = 0
    elif not isinstance(history_max_bytes, int) or isinstance(history_max_bytes, bool) or history_max_bytes < 1:
        raise ImproperlyConfigured(
            f"DJANGO_WS['HISTORY_MAX_BYTES'] must be a positive number of bytes, or None for no byte cap, "
            f"not {history_max_bytes!r}"
        )

    offload_to = _addresses(s["OFFLOAD_TO"] or os.environ.get("DJANGO_WS_OFFLOAD_TO") or ())
    ticket_secret = _ticket_secret(s["TICKET_SECRET"], offload_to)
    offload_registry = s["OFFLOAD_REGISTRY"]
    if offload_registry is None:
        offload_registry = os.environ.get("DJANGO_WS_OFFLOAD_REGISTRY", "").strip().lower() in ("1", "true", "yes")
    if not isinstance(offload_registry, bool):
        raise ImproperlyConfigured(f"DJANGO_WS['OFFLOAD_REGISTRY'] must be True or False, not {offload_registry!r}")
    if offload_registry and not offload_to:
        raise ImproperlyConfigured(
            "DJANGO_WS['OFFLOAD_REGISTRY'] chooses among the instances of OFFLOAD_TO: list them there "
            "(the registry never adds an address of its own)"
        )
    info_hook = s["PRESENCE_INFO"]
    if isinstance(info_hook, str):
        try:
            info_hook = import_string(info_hook)
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"DJANGO_WS['PRESENCE_INFO']: cannot import {s['PRESENCE_INFO']!r} ({exc})"
            ) from None
    if info_hook is not None and not callable(info_hook):
        raise ImproperlyConfigured("DJANGO_WS['PRESENCE_INFO'] must be a callable, its dotted path, or None")
    try:
        presence_events = Facilities.parse(s["PRESENCE_EVENTS"])
    except ImproperlyConfigured as exc:
        raise ImproperlyConfigured(str(exc).replace("'FACILITIES'", "'PRESENCE_EVENTS'")) from None

    publish_command = s["PUBLISH_COMMAND"] or os.environ.get("DJANGO_WS_PUBLISH_COMMAND") or "PUBLISH"
    try:
        check_publish_command(publish_command, redis_url)
    except ConfigurationError as exc:
        raise ImproperlyConfigured(f"DJANGO_WS['PUBLISH_COMMAND']: {exc}") from None

    return WsSettings(
        url=url,
        redis_url=redis_url,
        prefix=prefix,
        history_size=_int(s, "HISTORY_SIZE", 0),
        history_ttl=_positive(s, "HISTORY_TTL"),
        history_max_bytes=history_max_bytes,
        heartbeat=_positive(s, "HEARTBEAT"),
        allowed_origins=origins,
        allow_missing_origin=bool(s["ALLOW_MISSING_ORIGIN"]),
        facilities=facilities,
        authorize=hook,
        client_publish=frozenset(client_publish),
        max_message_size=_int(s, "MAX_MESSAGE_SIZE", 1),
        rate=float(rate[0]),
        burst=int(rate[1]),
        queue_messages=_int(s, "SEND_QUEUE_MESSAGES", 1),
        queue_bytes=_int(s, "SEND_QUEUE_BYTES", 1024),
        ticket_secret=ticket_secret,
        ticket_ttl=_positive(s, "TICKET_TTL"),
        offload_to=offload_to,
        offload_registry=offload_registry,
        publish_retries=_int(s, "PUBLISH_RETRIES", 0),
        publish_retry_delay=_positive(s, "PUBLISH_RETRY_DELAY"),
        publish_command=publish_command,
        disconnect_on_logout=bool(s["DISCONNECT_ON_LOGOUT"]),
        max_connection_age=None if s["MAX_CONNECTION_AGE"] is None else _positive(s, "MAX_CONNECTION_AGE"),
        unsubscribe_on_group_removal=bool(s["UNSUBSCRIBE_ON_GROUP_REMOVAL"]),
        presence=bool(s["PRESENCE"]),
        presence_ttl=_positive(s, "PRESENCE_TTL"),
        presence_info=info_hook,
        presence_events=presence_events,
        presence_stream_size=_int(s, "PRESENCE_STREAM_SIZE", 0),
    )


def _origin_patterns(value: Any, name: str, *, any_allowed: bool = False) -> tuple[OriginPattern, ...]:
    """Read a list of allowed origins (``name`` is the setting, for the messages).

    ``"*"`` (any origin) is ours: in ``CSRF_TRUSTED_ORIGINS`` Django gives it no
    meaning, so it is refused there rather than read as "everyone".
    """
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ImproperlyConfigured(
            f"{name} must be a list of origins such as ['https://example.com', 'https://*.example.com'], not {value!r}"
        )
    patterns = []
    for entry in value:
        if entry == "*" and not any_allowed:
            raise ImproperlyConfigured(f"{name}: '*' is not an origin; list the sites, e.g. 'https://*.example.com'")
        try:
            patterns.append(parse_origin_pattern(entry))
        except ValueError as exc:
            raise ImproperlyConfigured(f"{name}: {exc}") from None
    return tuple(patterns)


class TicketSecretError(ImproperlyConfigured):
    """The ticket secret is missing (when offloading) or unfit to sign tickets."""


SECRET_NAME = "DJANGO_WS['TICKET_SECRET'] (or $DJANGO_WS_SECRET)"
_process_secret: bytes | None = None


def _ticket_secret(configured: Any, offload_to: tuple[str, ...]) -> bytes:
    """The secret that signs tickets, under the one rule both sides apply.

    Offloading, tickets travel to the websocket instance, which must hold the same
    secret: it is required. Otherwise (development server, single instance) tickets
    never leave this process, and with no secret configured a random one is made
    for the life of the process. Never one derived from ``SECRET_KEY``: that would
    be a second use of a key that projects often leave in their repository.

    Raises:
        TicketSecretError: the secret is missing when offloading, or unfit.
    """
    global _process_secret
    if configured is not None and not isinstance(configured, (str, bytes)):
        raise TicketSecretError(f"{SECRET_NAME} must be a string, not {type(configured).__name__}")
    configured = configured or os.environ.get("DJANGO_WS_SECRET")
    if not configured and not offload_to:
        if _process_secret is None:
            _process_secret = os.urandom(32).hex().encode("ascii")
        return _process_secret
    try:
        return check_secret(configured, name=SECRET_NAME)
    except ConfigurationError as exc:
        raise TicketSecretError(str(exc)) from None


def check_offload_sockets(conf: WsSettings) -> None:
    """Refuse unix sockets in ``OFFLOAD_TO`` whose directory others may enter or change.

    The same rule as the websocket instance's (:func:`uwsgi_ws.config.check_socket_directory`):
    the front would hand every websocket, cookies included, to whoever put a socket
    there. TCP addresses are not checked: any local user may bind a free port first,
    or connect to it, which is why a unix socket is the default.

    Raises:
        ImproperlyConfigured: a socket's directory is missing or not private.
    """
    for address in conf.offload_to:
        path = unix_socket_path(address)
        if path is None:
            continue
        try:
            check_socket_directory(path, name=f"DJANGO_WS['OFFLOAD_TO'] {path}")
        except ConfigurationError as exc:
            raise ImproperlyConfigured(str(exc)) from None


def _addresses(value: Any) -> tuple[str, ...]:
    """OFFLOAD_TO as a tuple of socket addresses, from a string (comma-separated) or a list."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(a, str) for a in items):
        raise ImproperlyConfigured(f"DJANGO_WS['OFFLOAD_TO'] must be a socket address or a list of them, not {value!r}")
    addresses = tuple(a.strip() for a in items)
    for address in addresses:
        if not address or any(c.isspace() for c in address) or not (address.startswith("/") or ":" in address):
            raise ImproperlyConfigured(
                f"DJANGO_WS['OFFLOAD_TO']: {address!r} is not a uWSGI socket address (host:port or /unix/path)"
            )
    return addresses


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(s: dict[str, Any], name: str, minimum: int) -> int:
    value = s[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ImproperlyConfigured(f"DJANGO_WS['{name}'] must be an integer >= {minimum}, not {value!r}")
    return value


def _positive(s: dict[str, Any], name: str) -> float:
    value = s[name]
    if not _number(value) or value <= 0:
        raise ImproperlyConfigured(f"DJANGO_WS['{name}'] must be a positive number of seconds, not {value!r}")
    return float(value)
