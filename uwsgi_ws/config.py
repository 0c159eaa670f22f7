"""Configuration of the websocket instance, which never reads Django settings.

Only what the instance itself needs lives here: the shared ticket secret, where
Redis is, and how many connections it may open. Per-connection policy (limits,
history, heartbeat) is decided by Django and travels in the ticket.

Two start-up rules live here as well, because the Django side applies them to the
same values and both sides must agree: :func:`check_secret` (the ticket secret is
what every right rests on, so there is no default and a weak one stops the server)
and :func:`check_socket_directory` (whoever can put a socket where the front hands
websockets over receives every hand-over, cookies and tickets included).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from .exceptions import ConfigurationError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# Shorter ticket secrets are refused: 32 random bytes (the 64 hex digits of
# secrets.token_hex(32), or 32 of them from token_hex(16)) put guessing out of reach.
MIN_SECRET_BYTES = 32
# What a configuration file passes on when it did not substitute a value: uWSGI's
# $(ENV), @(file or exec://...) and %(placeholder), and the shell's ${NAME}.
PLACEHOLDER_MARKS = ("@(", "$(", "%(", "${")
_MAKE_SECRET = "$(python3 -c 'import secrets; print(secrets.token_hex(32))')"


def check_secret(secret: str | bytes | None, *, name: str = "DJANGO_WS_SECRET") -> bytes:
    """Return the ticket secret as bytes, if it is fit to sign tickets.

    The front (Django) and the websocket instance both call this, so they refuse the
    same values. The secret never appears in a message.

    Args:
        secret: the configured value; ``None`` or empty means not configured.
        name: how messages name the setting, e.g. ``"DJANGO_WS_SECRET"``.

    Raises:
        ConfigurationError: the secret is missing, shorter than
            :data:`MIN_SECRET_BYTES` bytes, or looks like an unexpanded placeholder
            (``@(``, ``$(``, ``%(`` or ``${``); the message names the setting and
            says what to do.
    """
    raw = secret.encode("utf-8") if isinstance(secret, str) else (secret or b"")
    if not raw:
        raise ConfigurationError(
            f"{name} is not set, and there is no default ticket secret: give Django and the "
            f"websocket instance the same random value, e.g. DJANGO_WS_SECRET={_MAKE_SECRET}"
        )
    text = raw.decode("utf-8", "replace")
    for mark in PLACEHOLDER_MARKS:
        if mark in text:
            raise ConfigurationError(
                f"{name} looks like an unexpanded placeholder (it contains {mark!r}): a configuration "
                f"file passed its own text on instead of a value; set {name} to the secret itself"
            )
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"{name} is too short ({len(raw)} bytes; at least {MIN_SECRET_BYTES} are needed): "
            f"use a long random value, e.g. DJANGO_WS_SECRET={_MAKE_SECRET}"
        )
    return raw


def unix_socket_path(address: str) -> str | None:
    """Return the file of a uWSGI socket address, or ``None`` if it names no file.

    As for uWSGI, ``host:port`` (and ``[ipv6]:port``) is TCP and ``@name`` is Linux's
    abstract namespace; anything else is a path, relative to the current directory.
    """
    address = address.strip()
    if not address or address.startswith("@") or ":" in address:
        return None
    return os.path.abspath(address)


def check_socket_directory(path: str, *, name: str = "DJANGO_WS_OFFLOAD_TO") -> None:
    """Refuse a unix socket whose directory another local user could enter or change.

    Whoever can create a file where the socket lives (or replace its directory) can
    bind there first, or after the websocket instance died, and receive every
    hand-over; whoever can enter it can connect to the websocket instance. So the
    socket's directory must be a real directory (not a symbolic link) that belongs
    to the user this process runs as, with no permission for group or others (mode
    0700), and every directory above it must belong to that user or root and be
    writable by nobody else (unless sticky, like /tmp, where nobody can rename or
    remove another user's entries). Symbolic links on the way must belong to that
    user or root too.

    Args:
        path: the socket's path.
        name: how messages name the setting the path comes from.

    Raises:
        ConfigurationError: the directory is missing or fails one of these rules;
            the message names ``name``, the directory and what to do.
    """
    directory = os.path.dirname(os.path.abspath(path))
    uid = os.geteuid()
    fix = (
        f"create it with mode 0700 as the user the servers run as (mkdir -m 0700 {directory}; "
        "with systemd: RuntimeDirectory= and RuntimeDirectoryMode=0700)"
    )
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise ConfigurationError(f"{name}: {directory}, the directory of the socket, does not exist: {fix}") from None
    except OSError as exc:
        raise ConfigurationError(f"{name}: cannot inspect {directory} ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigurationError(
            f"{name}: {directory}, the directory of the socket, is a symbolic link, which someone else "
            f"may have planted: use a real directory instead; {fix}"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"{name}: {directory} is not a directory: {fix}")
    if st.st_uid != uid:
        raise ConfigurationError(
            f"{name}: {directory}, the directory of the socket, belongs to uid {st.st_uid}, not to uid {uid} "
            f"that this server runs as, so that user could replace the socket: {fix}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigurationError(
            f"{name}: {directory}, the directory of the socket, has mode {mode:04o}: other users may enter it "
            f"and connect to the websocket instance; make it private (chmod 0700 {directory})"
        )
    _check_ancestors(directory, uid, name)


def _check_ancestors(directory: str, uid: int, name: str) -> None:
    """Refuse when a directory above ``directory`` lets another user replace it."""
    current = os.path.dirname(directory)
    while True:
        try:
            link = os.lstat(current)
            st = os.stat(current)
        except OSError as exc:
            raise ConfigurationError(f"{name}: cannot inspect {current} ({exc.strerror})") from None
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in (0, uid):
            raise ConfigurationError(
                f"{name}: {current}, on the way to the socket, is a symbolic link of uid {link.st_uid}, "
                "who could point it elsewhere: put the socket under directories of your own or root's"
            )
        writable_by_others = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
        if st.st_uid not in (0, uid) or writable_by_others:
            raise ConfigurationError(
                f"{name}: {current}, above the directory of the socket, can be changed by another user "
                f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}), who could replace the "
                "directory and the socket: put the socket under directories only you or root can write"
            )
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


@dataclass(frozen=True)
class Config:
    """Settings of a websocket instance.

    Attributes:
        secret: shared secret used to verify tickets; the same value as Django's
            ``DJANGO_WS["TICKET_SECRET"]``, and fit for it (:func:`check_secret`).
        redis_url: Redis URL (``redis://``, ``rediss://``, ``unix://``, or
            ``redis+sentinel://host:port,host:port/service/db``).
        clock_skew: seconds of clock difference tolerated when checking expiry.
        pool_size: connections a worker may use for publishing and history reads,
            besides its single subscriber connection.
        subscribe_timeout: seconds to wait for Redis to confirm a subscription.
        publish_command: ``PUBLISH`` or ``SPUBLISH`` (Redis Cluster).
        prefix: the Redis prefix of the instance registry (Django's ``PREFIX``).
        registry_interval: seconds between a worker's heartbeats in the registry
            (0: no registry, no metrics of other workers).
        drain_window: seconds over which a draining worker closes its connections.
        metrics: count the figures the metrics and the registry show.
        address: how the front reaches this instance (default: its first socket).
        ops_address: the instance's operations HTTP address, shown by ws_status.
    """

    secret: bytes
    redis_url: str = DEFAULT_REDIS_URL
    clock_skew: float = 5.0
    pool_size: int = 10
    subscribe_timeout: float = 10.0
    publish_command: str = "PUBLISH"
    prefix: str = "ws"
    registry_interval: float = 1.0
    drain_window: float = 5.0
    metrics: bool = True
    address: str = ""
    ops_address: str = ""

    def __post_init__(self) -> None:
        from .redis_url import check_publish_command, check_url

        check_url(self.redis_url)
        check_publish_command(self.publish_command, self.redis_url)
        check_secret(self.secret)
        if self.pool_size < 1:
            raise ConfigurationError(f"pool_size must be at least 1, not {self.pool_size}")
        from .exceptions import BadRequest
        from .protocol import validate_prefix

        try:
            validate_prefix(self.prefix)
        except (BadRequest, ValueError):
            raise ConfigurationError(f"DJANGO_WS_PREFIX: {self.prefix!r} is not a valid Redis prefix") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build the configuration from ``DJANGO_WS_*`` environment variables.

        Raises:
            ConfigurationError: ``DJANGO_WS_SECRET`` is missing or weak (see
                :func:`check_secret`), or a number is bad.
        """
        env = os.environ if environ is None else environ
        return cls(
            secret=check_secret(env.get("DJANGO_WS_SECRET")),
            redis_url=env.get("DJANGO_WS_REDIS_URL", DEFAULT_REDIS_URL),
            clock_skew=_number(env, "DJANGO_WS_CLOCK_SKEW", 5.0),
            pool_size=int(_number(env, "DJANGO_WS_POOL_SIZE", 10)),
            subscribe_timeout=_number(env, "DJANGO_WS_SUBSCRIBE_TIMEOUT", 10.0),
            publish_command=env.get("DJANGO_WS_PUBLISH_COMMAND", "PUBLISH"),
            prefix=env.get("DJANGO_WS_PREFIX", "") or "ws",
            registry_interval=_number(env, "DJANGO_WS_REGISTRY_INTERVAL", 1.0),
            drain_window=_number(env, "DJANGO_WS_DRAIN_WINDOW", 5.0),
            metrics=_flag(env, "DJANGO_WS_METRICS", True),
            address=env.get("DJANGO_WS_ADDRESS", ""),
            ops_address=env.get("DJANGO_WS_OPS_HTTP", ""),
        )


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be 1 or 0 (true or false), not {raw!r}")


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, not {raw!r}") from None
    if value < 0:
        raise ConfigurationError(f"{name} must not be negative, not {raw!r}")
    return value
