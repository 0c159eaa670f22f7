"""The pure protocol: names, tickets, envelopes, frames and recovery decisions.

Nothing here performs I/O or imports redis, uwsgi, gevent or Django, so every rule
can be tested with plain values. Both the Django side and the websocket instance
import this module; it is the single definition of the wire formats.

Redis naming
    One logical channel is a facility plus an audience. Every Redis name that
    belongs to it shares one hash tag, so a Lua script touching the history, the
    counters and the pub/sub channel stays within one Redis Cluster slot::

        {prefix:facility:broadcast}            pub/sub channel
        {prefix:facility:user:alice}:meta      hash: epoch, offset
        {prefix:facility:group:staff}:log      stream: the bounded history
        {prefix:rate:user:42}                  hash: one client's publish-rate bucket

    Audience names are percent-encoded so that ``{``, ``}`` and ``:`` in a group
    name cannot break the hash tag or the parsing.

Envelope (what Redis carries and keeps)
    ``sender \\n kind \\n offset \\n epoch \\n payload`` where kind is ``t`` (text),
    ``j`` (JSON text) or ``b`` (binary). The Lua publish script builds it, because
    only Redis knows the offset.

Client frames
    Text messages and control frames are JSON objects with a ``type``. Binary
    messages are a binary frame: a 2-byte big-endian header length, the JSON header
    (same fields as a text message, without ``data``), then the payload bytes.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import os
import re
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, unquote_plus

from .exceptions import BadRequest, InvalidArgument, TicketError, UnsupportedType

__all__ = [
    "MAX_OFFSET",
    "Audience",
    "Envelope",
    "Position",
    "Recovery",
    "Request",
    "Ticket",
    "channel_name",
    "client_frame",
    "decide_recovery",
    "parse_query",
    "validate_facility",
]

# --------------------------------------------------------------------------- names

FACILITY_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62}[A-Za-z0-9_-])?$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
# Characters left readable in audience names; everything else is percent-encoded.
_AUDIENCE_SAFE = "@.+-_"


class Kind(str, enum.Enum):
    """The audience kinds a channel can have."""

    BROADCAST = "broadcast"
    USER = "user"
    GROUP = "group"
    SESSION = "session"


@dataclass(frozen=True)
class Audience:
    """Who a channel reaches: everyone, one user, one group or one session."""

    kind: Kind
    name: str = ""

    @property
    def label(self) -> str:
        """Return the channel name shown to clients.

        A client only ever sees its own user and session channels, so their names
        (a session key is a secret) are not repeated on the wire.
        """
        if self.kind is Kind.GROUP:
            return "group:" + self.name
        return self.kind.value

    @property
    def tag(self) -> str:
        """Return what ``disconnect()`` matches connections of this audience by."""
        if self.kind is Kind.BROADCAST:
            raise ValueError("a broadcast audience names no connection")
        return f"{self.kind.value}:{self.name}"


def validate_facility(facility: str) -> str:
    """Return ``facility`` if it is a valid facility name, else raise BadRequest."""
    if not isinstance(facility, str) or not FACILITY_RE.fullmatch(facility) or ".." in facility:
        raise BadRequest(
            "invalid facility name: use 1 to 64 characters among letters, digits, "
            "'_', '-' and '.', starting with a letter or digit, without '..'"
        )
    return facility


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can be used as the Redis name prefix, else raise ValueError."""
    if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"invalid key prefix {prefix!r}: use 1 to 32 letters, digits, '_', '-' or '.'")
    return prefix


def channel_name(prefix: str, facility: str, audience: Audience) -> str:
    """Return the Redis pub/sub channel of ``facility`` for ``audience``."""
    if audience.kind is Kind.BROADCAST:
        return "{" + f"{prefix}:{facility}:broadcast" + "}"
    if not audience.name:
        raise ValueError(f"a {audience.kind.value} audience needs a name")
    name = quote(audience.name, safe=_AUDIENCE_SAFE)
    return "{" + f"{prefix}:{facility}:{audience.kind.value}:{name}" + "}"


def parse_channel(channel: str) -> tuple[str, str, Audience]:
    """Split a Redis channel name into prefix, facility and audience."""
    if not (channel.startswith("{") and channel.endswith("}")):
        raise ValueError(f"not a channel name: {channel!r}")
    parts = channel[1:-1].split(":", 3)
    if len(parts) == 3 and parts[2] == "broadcast":
        return parts[0], parts[1], Audience(Kind.BROADCAST)
    if len(parts) == 4 and parts[2] in ("user", "group", "session"):
        return parts[0], parts[1], Audience(Kind(parts[2]), unquote(parts[3]))
    raise ValueError(f"not a channel name: {channel!r}")


def channel_label(channel: str) -> str:
    """Return the client-facing label of a Redis channel name.

    The join/leave channel of a channel (see :func:`presence_channel`) has the label
    of the channel it tells about.
    """
    if channel.endswith(":control}") and channel.count(":") == 1:
        return "control"  # the workers' own channel (see control_channel); no client sees it
    if channel.endswith("}" + PRESENCE_SUFFIX):
        channel = channel[: -len(PRESENCE_SUFFIX)]
    return parse_channel(channel)[2].label


PRESENCE_SUFFIX = ":presence"


def presence_channel(channel: str) -> str:
    """Return the pub/sub channel carrying the join and leave events of ``channel``.

    It shares the channel's hash tag. No ticket ever grants publishing to it (client
    publish rights are channel names made by :func:`channel_name`), so only the
    websocket instance's presence code writes there.
    """
    return channel + PRESENCE_SUFFIX


def members_key(channel: str) -> str:
    """Return the key of the hash of a channel's connections (see uwsgi_ws.presence)."""
    return channel + ":members"


def workers_key(channel: str) -> str:
    """Return the key of the sorted set of the leases of a channel's workers."""
    return channel + ":workers"


def users_key(channel: str) -> str:
    """Return the key of the hash counting a channel's connections per user."""
    return channel + ":users"


def presence_index_key(prefix: str) -> str:
    """Return the key of the project's index of channels with presence entries."""
    return "{" + f"{prefix}:presence" + "}"


def presence_events_key(prefix: str) -> str:
    """Return the key of the project's stream of presence changes (``ws_events``)."""
    return "{" + f"{prefix}:presence-events" + "}"


def meta_key(channel: str) -> str:
    """Return the key of the hash holding a channel's epoch and last offset."""
    return channel + ":meta"


def log_key(channel: str) -> str:
    """Return the key of the stream holding a channel's bounded history."""
    return channel + ":log"


def rate_key(prefix: str, identity: str) -> str:
    """Return the key of the publish-rate bucket of one client identity.

    ``identity`` is who publishes (``user:<pk>``, ``session:<digest>``, ``addr:<ip>``),
    never a secret. The key is its own hash tag, so the rate script touches one slot.
    """
    return "{" + f"{prefix}:rate:{quote(identity, safe=_AUDIENCE_SAFE + ':')}" + "}"


# --------------------------------------------------------------------------- query

SUBSCRIBE_FLAGS = {
    "subscribe-broadcast": Kind.BROADCAST,
    "subscribe-user": Kind.USER,
    "subscribe-group": Kind.GROUP,
    "subscribe-session": Kind.SESSION,
}
PUBLISH_FLAGS = {
    "publish-broadcast": Kind.BROADCAST,
    "publish-user": Kind.USER,
    "publish-group": Kind.GROUP,
    "publish-session": Kind.SESSION,
}
OTHER_FLAGS = ("echo", "latest", "presence")
MAX_QUERY_LENGTH = 8192
#: The largest offset a channel can reach: Redis counts with HINCRBY, on a signed
#: 64-bit integer. A position beyond it cannot name a message (and 2^64 and more are
#: not even valid stream ids), so it is refused as malformed.
MAX_OFFSET = 2**63 - 1


@dataclass(frozen=True)
class Position:
    """Where a client stands in one channel: the last offset seen, in an epoch."""

    offset: int
    epoch: str


@dataclass(frozen=True)
class Request:
    """What a client asked for in the query string of its websocket URL."""

    subscribe: frozenset[Kind] = frozenset()
    publish: frozenset[Kind] = frozenset()
    echo: bool = False
    latest: bool = False
    recover: Mapping[str, Position] = field(default_factory=dict)
    #: ``presence``: receive join and leave events of the subscribed channels.
    presence: bool = False


def parse_query(query: str) -> Request:
    """Parse a ws4redis-style query string, e.g. ``subscribe-user&publish-broadcast&echo``.

    ``recover`` carries the positions a reconnecting client last saw, as JSON:
    ``recover={"broadcast":[12,"1700000000.123"]}`` (URL-encoded).

    Raises:
        BadRequest: unknown or repeated parameters, values on flags, a bad
            ``recover`` document, or a request that neither subscribes nor publishes.
    """
    if len(query) > MAX_QUERY_LENGTH:
        raise BadRequest(f"query string longer than {MAX_QUERY_LENGTH} characters")
    seen: set[str] = set()
    subscribe: set[Kind] = set()
    publish: set[Kind] = set()
    flags: set[str] = set()
    recover: dict[str, Position] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = unquote_plus(name)
        if name in seen:
            raise BadRequest(f"query parameter {name!r} given twice")
        seen.add(name)
        if name == "recover":
            recover = _parse_positions(unquote_plus(value))
            continue
        if value:
            raise BadRequest(f"query parameter {name!r} takes no value")
        if name in SUBSCRIBE_FLAGS:
            subscribe.add(SUBSCRIBE_FLAGS[name])
        elif name in PUBLISH_FLAGS:
            publish.add(PUBLISH_FLAGS[name])
        elif name in OTHER_FLAGS:
            flags.add(name)
        else:
            shown = name if len(name) <= 40 else name[:40] + "..."
            raise BadRequest(
                f"unknown query parameter {shown!r}; expected subscribe-*, publish-* "
                "(broadcast, user, group, session), echo, latest, presence or recover"
            )
    if not subscribe and not publish:
        raise BadRequest(
            "nothing requested: add subscribe-broadcast, subscribe-user, subscribe-group, "
            "subscribe-session or a publish-* parameter to the query string"
        )
    return Request(
        subscribe=frozenset(subscribe),
        publish=frozenset(publish),
        echo="echo" in flags,
        latest="latest" in flags,
        recover=recover,
        presence="presence" in flags,
    )


def _parse_positions(text: str) -> dict[str, Position]:
    try:
        document = json.loads(text)
    except ValueError:
        raise BadRequest("recover must be a JSON object") from None
    if not isinstance(document, dict) or len(document) > 256:
        raise BadRequest("recover must be a JSON object of at most 256 channels")
    positions = {}
    for label, value in document.items():
        if (
            not isinstance(value, list)
            or len(value) != 2
            or type(value[0]) is not int
            or not isinstance(value[1], str)
            or not 0 <= value[0] <= MAX_OFFSET
            or len(value[1]) > 64
        ):
            raise BadRequest(
                'recover entries must look like "channel": [offset, "epoch"] with a non-negative integer offset '
                f"(at most {MAX_OFFSET})"
            )
        positions[label] = Position(value[0], value[1])
    return positions


# --------------------------------------------------------------------------- ticket

TICKET_VERSION = 2


@dataclass(frozen=True)
class Limits:
    """Per-connection limits, decided by the Django side and carried in the ticket."""

    max_message_size: int = 65536
    rate: float = 10.0
    burst: int = 20
    queue_messages: int = 1000
    queue_bytes: int = 1 << 20
    heartbeat: float = 20.0
    history_size: int = 100
    history_ttl: float = 900.0
    # Bytes of history kept per channel (0: no cap). Last, with a default: tickets
    # signed before it existed still parse.
    history_max_bytes: int = 0


@dataclass(frozen=True)
class Ticket:
    """Everything the websocket instance needs to serve one connection.

    Django signs it after authenticating and authorizing the request; the websocket
    instance trusts nothing else about the connection. A ticket is used once (its
    ``nonce`` is claimed in Redis) and only for the handshake it was made for (its
    ``key``), so one that leaks cannot open another connection.

    Attributes:
        subscribe: client label -> Redis channel, for every channel to listen on.
        publish: Redis channels the client may publish its own frames to.
        echo: deliver the client's own publications back to it.
        latest: on connect, send the last message kept in each channel's history.
        recover: client label -> position to resume from.
        identity: who this is, for logs and the shared publish rate limit
            (``user:<pk>``, ``session:<digest>``, ``addr:<ip>``); never a secret.
        limits: the connection's limits.
        expires: Unix time after which the ticket is refused.
        stream: serve a Server-Sent Events stream instead of a websocket.
        nonce: random; the websocket instance accepts each nonce once.
        key: the ``Sec-WebSocket-Key`` of the handshake (empty for event streams).
        prefix: the project's Redis prefix (names the nonce and control keys).
        tags: what ``disconnect()`` can match this connection by: ``user:<name>``,
            ``group:<name>`` and ``session:<digest>``.
        max_age: seconds after which the connection is closed so that the client
            reconnects with fresh rights (0: no limit).
        presence: the subscribed channels (Redis names) this connection is listed in.
        presence_events: the subscribed channels whose join and leave events it gets.
        presence_user: the username it is listed under ('' for anonymous: counted,
            not listed).
        presence_info: what the project's ``PRESENCE_INFO`` hook returned (JSON).
        presence_ttl: seconds within which its entries expire if its worker dies.
        presence_stream: presence changes kept in the project's stream (0: none).
    """

    subscribe: Mapping[str, str]
    publish: tuple[str, ...] = ()
    echo: bool = False
    latest: bool = False
    recover: Mapping[str, Position] = field(default_factory=dict)
    identity: str = "anonymous"
    limits: Limits = field(default_factory=Limits)
    expires: float = 0.0
    stream: bool = False
    nonce: str = field(default_factory=lambda: new_nonce())
    key: str = ""
    prefix: str = "ws"
    tags: tuple[str, ...] = ()
    max_age: float = 0.0
    presence: tuple[str, ...] = ()
    presence_events: tuple[str, ...] = ()
    presence_user: str = ""
    presence_info: Any = None
    presence_ttl: float = 30.0
    presence_stream: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": TICKET_VERSION,
            "s": dict(self.subscribe),
            "p": list(self.publish),
            "e": self.echo,
            "l": self.latest,
            "r": {k: [p.offset, p.epoch] for k, p in self.recover.items()},
            "i": self.identity,
            "m": [
                self.limits.max_message_size,
                self.limits.rate,
                self.limits.burst,
                self.limits.queue_messages,
                self.limits.queue_bytes,
                self.limits.heartbeat,
                self.limits.history_size,
                self.limits.history_ttl,
                self.limits.history_max_bytes,
            ],
            "x": self.expires,
            "t": self.stream,
            "n": self.nonce,
            "w": self.key,
            "k": self.prefix,
            "g": list(self.tags),
            "a": self.max_age,
            # by label, not channel name: a user in many groups must not double the ticket
            "ps": [
                [label for label, channel in self.subscribe.items() if channel in self.presence],
                [label for label, channel in self.subscribe.items() if channel in self.presence_events],
                self.presence_user,
                self.presence_info,
                self.presence_ttl,
                self.presence_stream,
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ticket:
        if data.get("v") != TICKET_VERSION:
            raise TicketError("unsupported ticket version")
        try:
            return cls(
                subscribe={str(k): str(v) for k, v in data["s"].items()},
                publish=tuple(str(c) for c in data["p"]),
                echo=bool(data["e"]),
                latest=bool(data["l"]),
                recover={str(k): Position(int(v[0]), str(v[1])) for k, v in data["r"].items()},
                identity=str(data["i"]),
                limits=Limits(*data["m"]),
                expires=float(data["x"]),
                stream=bool(data["t"]),
                nonce=_nonempty(str(data["n"])),
                key=str(data["w"]),
                prefix=validate_prefix(str(data["k"])),
                tags=tuple(str(t) for t in data["g"]),
                max_age=float(data["a"]),
                **_presence_fields(data.get("ps"), data["s"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            raise TicketError("malformed ticket") from None


def _presence_fields(value: Any, subscribe: Mapping[str, Any]) -> dict[str, Any]:
    if value is None:  # signed before presence existed
        return {}
    labels, events, user, info, ttl, stream = value
    return {
        "presence": tuple(str(subscribe[label]) for label in labels),
        "presence_events": tuple(str(subscribe[label]) for label in events),
        "presence_user": str(user),
        "presence_info": info,
        "presence_ttl": float(ttl),
        "presence_stream": int(stream),
    }


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError("empty")
    return text


def new_nonce() -> str:
    """Return a fresh ticket nonce: 128 random bits."""
    return _b64(os.urandom(16))


def nonce_key(prefix: str, nonce: str) -> str:
    """Return the Redis key that marks the ticket with ``nonce`` as used."""
    return "{" + f"{prefix}:ticket:{nonce}" + "}"


def control_channel(prefix: str) -> str:
    """Return the pub/sub channel carrying ``disconnect()`` orders to every worker."""
    return "{" + f"{prefix}:control" + "}"


# Close codes a ``disconnect()`` may use. 4100-4199 ask the client to stay away (the
# browser client does not reconnect after them: the identity it connected with is
# gone); the rest of 4000-4999 ask it to reconnect, e.g. to pick up changed rights.
# 4008 and 4009 are the server's own (slow consumer, heartbeat timeout).
CLOSE_DISCONNECTED = 4100
TERMINAL_CLOSE_CODES = range(4100, 4200)
RESERVED_CLOSE_CODES = frozenset({4008, 4009, 4010})
MAX_REASON_BYTES = 120  # a close frame's payload is at most 125 bytes, 2 of them the code


@dataclass(frozen=True)
class Disconnect:
    """An order to close every local connection carrying one of ``tags``.

    ``issued`` is the Unix time at which Django gave the order: a connection that
    started clearly later (more than the tolerated clock skew) is not closed by it,
    since it was authorized after the order (a replay of the order from history
    after a Redis reconnection must not close connections made since).
    """

    tags: tuple[str, ...]
    code: int = CLOSE_DISCONNECTED
    reason: str = ""
    issued: float = 0.0


def check_close(code: int, reason: str) -> None:
    """Raise ValueError unless ``code`` and ``reason`` can close a connection on order."""
    if type(code) is not int or not 4000 <= code <= 4999 or code in RESERVED_CLOSE_CODES:
        raise InvalidArgument(
            f"close code {code!r} cannot be used: pick one in 4000-4999 except "
            f"{', '.join(map(str, sorted(RESERVED_CLOSE_CODES)))} (4100-4199: the browser client does not reconnect)"
        )
    if not isinstance(reason, str) or len(reason.encode("utf-8")) > MAX_REASON_BYTES:
        raise InvalidArgument(f"the close reason must be a string of at most {MAX_REASON_BYTES} bytes in UTF-8")


def encode_disconnect(order: Disconnect) -> bytes:
    """Return the control message carrying ``order``."""
    check_close(order.code, order.reason)
    document = {
        "type": "disconnect",
        "tags": list(order.tags),
        "code": order.code,
        "reason": order.reason,
        "issued": order.issued,
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class Unsubscribe:
    """An order to end one subscription of every local connection carrying one of ``tags``.

    ``audience`` is the client-facing label of the subscription to end
    (``"group:staff"``, ``"broadcast"``, ``"user"``); ``facility`` limits it to one
    facility (None: every facility). The connection stays open; ``issued`` works as
    for :class:`Disconnect`.
    """

    tags: tuple[str, ...]
    audience: str
    facility: str | None = None
    issued: float = 0.0


def encode_unsubscribe(order: Unsubscribe) -> bytes:
    """Return the control message carrying ``order``."""
    document = {
        "type": "unsubscribe",
        "tags": list(order.tags),
        "audience": order.audience,
        "facility": order.facility,
        "issued": order.issued,
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def decode_control(payload: bytes) -> Disconnect | Unsubscribe:
    """Parse a control message made by :func:`encode_disconnect` or :func:`encode_unsubscribe`.

    Raises:
        ValueError: not a control message this version understands.
    """
    try:
        document = json.loads(payload)
        if not isinstance(document, dict) or document.get("type") not in ("disconnect", "unsubscribe"):
            raise ValueError("not a control order")
        tags = document["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError("tags must be a list of strings")
        issued = document["issued"]
        if not isinstance(issued, (int, float)) or isinstance(issued, bool):
            raise ValueError("issued must be a number")
        if document["type"] == "unsubscribe":
            audience, facility = document["audience"], document["facility"]
            if not isinstance(audience, str) or not (facility is None or isinstance(facility, str)):
                raise ValueError("audience must be a string and facility a string or null")
            return Unsubscribe(tuple(tags), audience, facility, float(issued))
        order = Disconnect(tuple(tags), document["code"], document["reason"], float(issued))
    except (KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed control message ({type(exc).__name__})") from None
    check_close(order.code, order.reason)
    return order


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, body: str) -> str:
    return _b64(hmac.new(secret, b"django-ws-ticket:" + body.encode("ascii"), hashlib.sha256).digest())


def sign_ticket(ticket: Ticket, secret: bytes) -> str:
    """Serialise and sign ``ticket`` with HMAC-SHA256."""
    if not secret:
        raise ValueError("the ticket secret must not be empty")
    body = _b64(json.dumps(ticket.to_dict(), separators=(",", ":")).encode("utf-8"))
    return body + "." + _mac(secret, body)


def verify_ticket(token: str | None, secret: bytes, *, now: float | None = None, leeway: float = 5.0) -> Ticket:
    """Check the signature and expiry of a ticket and return it.

    Args:
        token: the signed ticket, or None when the request carried none.
        secret: the shared secret of the Django side and the websocket instance.
        now: the current Unix time (for tests).
        leeway: seconds of clock skew tolerated between hosts.

    Raises:
        TicketError: missing, malformed, forged or expired ticket.
    """
    if not token:
        raise TicketError("missing ticket")
    if len(token) > 65536:
        raise TicketError("malformed ticket")
    body, sep, mac = token.partition(".")
    if not sep or not body or not mac:
        raise TicketError("malformed ticket")
    try:
        expected = _mac(secret, body)
    except (UnicodeEncodeError, ValueError):
        raise TicketError("malformed ticket") from None
    if not mac.isascii() or not hmac.compare_digest(expected, mac):
        raise TicketError("bad ticket signature")
    try:
        data = json.loads(_unb64(body))
    except ValueError:
        raise TicketError("malformed ticket") from None
    if not isinstance(data, dict):
        raise TicketError("malformed ticket")
    ticket = Ticket.from_dict(data)
    if (time.time() if now is None else now) > ticket.expires + leeway:
        raise TicketError("expired ticket")
    return ticket


# --------------------------------------------------------------------------- envelope

KIND_TEXT = b"t"
KIND_JSON = b"j"
KIND_BINARY = b"b"


@dataclass(frozen=True)
class Envelope:
    """One published message as Redis carries and keeps it.

    ``published`` is the Unix time of the publish call, stamped by the publisher
    (0.0 for envelopes published before stamps existed): the delivery lag is measured
    from it.
    """

    sender: bytes
    kind: bytes
    offset: int
    epoch: str
    payload: bytes
    published: float = 0.0


def stamp_sender(sender: bytes, now: float | None = None) -> bytes:
    """Return the envelope's first field: the sender id and the publish time.

    Sender ids are hex digits (or empty), so ``@`` separates the two.
    """
    return b"%s@%.6f" % (sender, time.time() if now is None else now)


def encode_payload(message: Any) -> tuple[bytes, bytes]:
    """Return (kind, payload bytes) for a message given to ``publish``.

    str is sent as text, bytes/bytearray/memoryview as binary, and anything else
    as JSON.

    Raises:
        TypeError: the message is neither text, bytes nor JSON-serialisable.
    """
    if isinstance(message, str):
        return KIND_TEXT, message.encode("utf-8")
    if isinstance(message, (bytes, bytearray, memoryview)):
        return KIND_BINARY, bytes(message)
    try:
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UnsupportedType(
            f"cannot publish a {type(message).__name__}: pass str, bytes or a JSON-serialisable value ({exc})"
        ) from None
    return KIND_JSON, text.encode("utf-8")


def decode_envelope(raw: bytes) -> Envelope:
    """Parse an envelope built by the publish script.

    Raises:
        ValueError: ``raw`` is not an envelope.
    """
    parts = raw.split(b"\n", 4)
    if len(parts) != 5 or parts[1] not in (KIND_TEXT, KIND_JSON, KIND_BINARY):
        raise ValueError("not an envelope")
    sender, _, stamp = parts[0].partition(b"@")
    try:
        published = float(stamp) if stamp else 0.0
    except ValueError:
        raise ValueError("not an envelope") from None
    return Envelope(sender, parts[1], int(parts[2]), parts[3].decode("ascii"), parts[4], published)


# --------------------------------------------------------------------------- frames

OP_TEXT = 0x1
OP_BINARY = 0x2


def frame(opcode: int, payload: bytes) -> bytes:
    """Return one complete, unmasked server-to-client websocket frame."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return header + payload


def text_frame(document: Mapping[str, Any]) -> bytes:
    """Return a text frame carrying ``document`` as compact JSON."""
    return frame(OP_TEXT, json.dumps(document, separators=(",", ":")).encode("utf-8"))


def client_frame(label: str, envelope: Envelope) -> bytes:
    """Return the websocket frame that delivers ``envelope`` on channel ``label``.

    The result does not depend on the receiver, so the Hub builds it once per
    message and every subscribed connection sends the same bytes.
    """
    if envelope.kind == KIND_BINARY:
        header = json.dumps(
            {"type": "message", "channel": label, "offset": envelope.offset, "epoch": envelope.epoch},
            separators=(",", ":"),
        ).encode("utf-8")
        return frame(OP_BINARY, struct.pack("!H", len(header)) + header + envelope.payload)
    if envelope.kind == KIND_JSON:
        data = envelope.payload
    else:
        data = json.dumps(envelope.payload.decode("utf-8"), ensure_ascii=False).encode("utf-8")
    head = json.dumps(
        {"type": "message", "channel": label, "offset": envelope.offset, "epoch": envelope.epoch},
        separators=(",", ":"),
    ).encode("utf-8")
    # Splice the data in as raw JSON: it is already encoded, by the publisher.
    return frame(OP_TEXT, head[:-1] + b',"data":' + data + b"}")


def parse_binary_message(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Split a binary message frame's payload into its JSON header and data."""
    if len(payload) < 2:
        raise ValueError("binary message too short")
    (n,) = struct.unpack("!H", payload[:2])
    return json.loads(payload[2 : 2 + n]), payload[2 + n :]


# --------------------------------------------------------------------------- recovery


@dataclass(frozen=True)
class Recovery:
    """The outcome of resuming one channel.

    Attributes:
        recovered: every missed message is in ``envelopes`` (None: nothing was asked).
        envelopes: the messages to deliver, in order.
        position: where the client stands after them.
    """

    recovered: bool | None
    envelopes: tuple[Envelope, ...]
    position: Position


def decide_recovery(
    since: Position | None,
    epoch: str | None,
    top: int,
    history: Iterable[Envelope],
    *,
    latest: bool = False,
) -> Recovery:
    """Decide what a (re)connecting client receives on one channel.

    Args:
        since: the position the client last saw, or None on a first connection.
        epoch: the channel's current epoch, or None if Redis holds nothing for it.
        top: the channel's current last offset (0 when ``epoch`` is None).
        history: the kept messages after ``since`` (or the last one, for
            ``latest``), oldest first, as read atomically with ``epoch`` and ``top``.
        latest: on a first connection, deliver the last kept message.

    A client that saw nothing (offset 0) accepts any epoch: everything from offset 1
    must then be in the history. Otherwise the epochs must match and the history
    must hold every offset after ``since``, without a gap. A client of an older
    epoch is not recovered (what it missed of that epoch is gone), but is given the
    current epoch's messages if the history holds them up to ``top``: published
    after Redis lost its state, they were never delivered to it.

    The cost is bounded by the length of ``history``, whatever ``since`` and ``top``
    are: the client chooses the first, and a channel's counter only grows (10^12 is a
    valid ``top``), so nothing here may be proportional to their difference.
    """
    current = Position(top, epoch or "")
    entries = tuple(history)
    if since is None:
        if latest and entries:
            return Recovery(None, entries[-1:], current)
        return Recovery(None, (), current)
    if epoch is None:
        return Recovery(since.offset == 0, (), current)
    if since.offset and since.epoch != epoch:
        # The channel started again (Redis lost its state): what the client missed
        # of the old epoch is gone, but the new one's messages, all unseen, are
        # delivered if the history still holds them up to ``top`` without a gap.
        if entries and entries[-1].offset == top and _consecutive(entries):
            return Recovery(False, entries, current)
        return Recovery(False, (), current)
    if since.offset > top:
        return Recovery(False, (), current)
    wanted = tuple(e for e in entries if e.offset > since.offset)
    # Exactly the offsets since+1 .. top, each once and in order: as many entries as
    # missed messages, each one more than the one before. (Checking the count first
    # rejects a short history, however large the gap, without walking it.)
    if len(wanted) != top - since.offset:
        return Recovery(False, (), current)
    for expected, envelope in enumerate(wanted, since.offset + 1):
        if envelope.offset != expected:
            return Recovery(False, (), current)
    return Recovery(True, wanted, current)


def _consecutive(entries: tuple[Envelope, ...]) -> bool:
    """Whether ``entries`` are one epoch's messages with offsets one after another."""
    first = entries[0]
    return all(e.epoch == first.epoch and e.offset == first.offset + i for i, e in enumerate(entries))


# --------------------------------------------------------------------------- limits


class RateLimiter:
    """A token bucket: ``rate`` messages per second with bursts of ``burst``."""

    __slots__ = ("rate", "burst", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: int, *, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def allow(self, now: float) -> bool:
        """Take one token if one is available at time ``now``."""
        if self.rate <= 0:
            return True
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


# --------------------------------------------------------------------------- handshake

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def check_handshake(method: str, headers: Mapping[str, str]) -> str:
    """Check the headers of a websocket opening handshake and return the key.

    ``headers`` maps WSGI names (``HTTP_UPGRADE``) to values.

    Raises:
        BadRequest: with status 405 (method), 426 (not an upgrade or a version
            other than 13) or 400 (missing or malformed key).
    """
    if method != "GET":
        raise BadRequest("websocket handshakes use GET", status=405)
    if headers.get("HTTP_UPGRADE", "").strip().lower() != "websocket":
        raise BadRequest("this URL serves websockets: send an 'Upgrade: websocket' handshake", status=426)
    tokens = {t.strip().lower() for t in headers.get("HTTP_CONNECTION", "").split(",")}
    if "upgrade" not in tokens:
        raise BadRequest("the handshake needs 'Connection: Upgrade'", status=400)
    if headers.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        raise BadRequest("unsupported websocket version: use 13", status=426)
    key = headers.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        raw = base64.b64decode(key.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        raise BadRequest("missing or malformed Sec-WebSocket-Key", status=400)
    return key


def accept_key(key: str) -> str:
    """Return the Sec-WebSocket-Accept value answering ``key``."""
    digest = hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


# --------------------------------------------------------------------------- Server-Sent Events

SSE_HEADERS = [
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache, no-transform"),
    ("X-Accel-Buffering", "no"),  # nginx: do not buffer the stream
]

# Sent every heartbeat on an event stream (a comment would be invisible to EventSource).
SSE_HEARTBEAT = b'event: heartbeat\ndata: {"type":"heartbeat"}\n\n'


def wants_event_stream(method: str, headers: Mapping[str, str]) -> bool:
    """Tell whether a request asks for a Server-Sent Events stream rather than a websocket."""
    return method == "GET" and "text/event-stream" in headers.get("HTTP_ACCEPT", "") and not headers.get("HTTP_UPGRADE")


def encode_event_id(positions: Mapping[str, tuple[int, str]]) -> str:
    """Return an SSE event id carrying every channel's position (label -> (offset, epoch)).

    The browser sends the last id back as Last-Event-ID when it reconnects, so one id
    must describe all channels of the stream.
    """
    document = {label: [offset, epoch] for label, (offset, epoch) in positions.items()}
    return _b64(json.dumps(document, separators=(",", ":")).encode("utf-8"))


def parse_event_id(text: str) -> dict[str, Position]:
    """Read the positions of a Last-Event-ID made by :func:`encode_event_id`.

    Raises:
        BadRequest: the id is not one of ours.
    """
    try:
        document = _unb64(text.strip()).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("malformed Last-Event-ID") from None
    return _parse_positions(document)


def sse_event(event: str, data: str, event_id: str | None = None) -> bytes:
    """Return one Server-Sent Event; a multi-line ``data`` becomes several data lines."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"{head}event: {event}\n{lines}\n".encode()


def sse_message_data(label: str, envelope: Envelope) -> str:
    """Return the JSON carried by an SSE "message" event: a websocket text message's
    document; binary payloads are base64-encoded with ``"binary": true``."""
    head = {"type": "message", "channel": label, "offset": envelope.offset, "epoch": envelope.epoch}
    if envelope.kind == KIND_BINARY:
        head["data"] = base64.b64encode(envelope.payload).decode("ascii")
        head["binary"] = True
        return json.dumps(head, separators=(",", ":"))
    if envelope.kind == KIND_JSON:
        data = envelope.payload.decode("utf-8")
    else:
        data = json.dumps(envelope.payload.decode("utf-8"), ensure_ascii=False)
    text = json.dumps(head, separators=(",", ":"))
    return text[:-1] + ',"data":' + data + "}"
