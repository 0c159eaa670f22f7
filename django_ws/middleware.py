"""The websocket middleware: authenticate and authorize in Django, then hand over.

Put it after SessionMiddleware and AuthenticationMiddleware. For a request under
``WEBSOCKET_URL`` it checks the handshake, the Origin, the facility and the query,
resolves the requested subscriptions to concrete Redis channels for this user (groups
read fresh from the database), runs the authorization hook, and signs a short-lived
ticket. Then, depending on the server:

* offload (``DJANGO_WS["OFFLOAD_TO"]`` set, under uWSGI): the ticket and the
  websocket instance's address go to uWSGI with ``uwsgi.add_var``; the response
  routes of uwsgi.ini.example hand the connection to that instance through an
  offload thread, and this worker is free at once;
* single instance (``django_ws.wsgi`` under uWSGI with gevent): the ticket goes
  into the WSGI environ and the wrapper serves the websocket in this greenlet
  once Django has finished the request.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from django.core.exceptions import DisallowedHost, ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse

from uwsgi_ws.exceptions import BadRequest, PublishError, Refused
from uwsgi_ws.protocol import (
    KIND_BINARY,
    KIND_TEXT,
    Audience,
    Kind,
    Ticket,
    channel_label,
    channel_name,
    check_handshake,
    encode_payload,
    parse_event_id,
    parse_query,
    rate_key,
    sign_ticket,
    validate_facility,
    wants_event_stream,
)

from .conf import WsSettings, check_offload_sockets, get_settings
from .handover import next_address
from .identity import client_identity, session_digest
from .logout import close_ended_sessions, watch_session
from .origins import Origin, parse_origin, split_host
from .presence import info_for, requested_channel

logger = logging.getLogger(__name__)

TICKET_VAR = "DJANGO_WS_TICKET"
OFFLOAD_VAR = "DJANGO_WS_OFFLOAD"
# The number of this worker thread (1, 2, ...): uwsgi.ini.example gives each thread its
# own hand-over route, because uWSGI's "uwsgi" route action writes the packet size
# into memory owned by the route, shared by the threads that run it at once.
SLOT_VAR = "DJANGO_WS_SLOT"
_slots = itertools.count(1)
_thread = threading.local()
# The id of the event stream that POSTs (its "ready" event's sender): the stream then
# does not get its own messages back, as a websocket without ``echo`` does not.
_SENDER_RE = re.compile(r"[0-9a-f]{1,64}")
# What a POST may carry: its Content-Type -> how it is published.
_BODY_KINDS = {"text/plain": "text", "application/json": "json", "application/octet-stream": "binary"}
_CONTENT_LENGTH_RE = re.compile(r"[0-9]+")
# Values of Sec-Fetch-Site (sent by browsers; no page can set it) for a request that a
# page of another origin made.
_OTHER_SITES = frozenset({"cross-site", "same-site"})


def thread_slot() -> str:
    """Return this thread's number in the process, 1 for the first thread that asks."""
    try:
        return _thread.slot  # type: ignore[no-any-return]
    except AttributeError:
        _thread.slot = str(next(_slots))  # itertools.count is atomic under the GIL
        return _thread.slot  # type: ignore[no-any-return]


# Set in the WSGI environ by servers that run websockets in-process.
SERVER_KEY = "django_ws.server"


class WebSocketMiddleware:
    """Turn websocket handshakes under ``WEBSOCKET_URL`` into signed hand-overs."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        """Check the settings now, when the WSGI handler loads.

        A server that cannot hand websockets over safely (no or a weak ticket secret
        while offloading, a hand-over socket in a directory others may enter) must not
        start: under uWSGI with ``need-app`` the front then exits with an error
        instead of serving pages whose websockets all fail.

        Raises:
            ImproperlyConfigured: a setting is bad; the message names it.
        """
        self.get_response = get_response
        try:
            check_offload_sockets(get_settings())
        except ImproperlyConfigured as exc:
            # One readable line before the traceback the server prints.
            logger.critical("django_ws cannot start: %s", exc)
            raise

    def __call__(self, request: HttpRequest) -> HttpResponse:
        conf = get_settings()
        if not request.path_info.startswith(conf.url):
            ended = watch_session(request) if conf.disconnect_on_logout else None
            response = self.get_response(request)
            if ended:
                close_ended_sessions(request, ended)
            return response
        facility = request.path_info[len(conf.url) :]
        try:
            if request.method == "POST":
                return self.publish(request, facility, conf)
            if _asks_roster(request):
                return self.roster(request, facility, conf)
            ticket = self.authorize(request, facility, conf)
        except BadRequest as exc:
            if isinstance(exc, Refused):
                logger.info("refused %s %s: %s", request.method, request.path_info, exc.message)
            return _plain(exc.status, exc.message)
        return self.hand_over(request, sign_ticket(ticket, conf.ticket_secret), conf)

    # ----------------------------------------------------------------- decisions

    def authorize(self, request: HttpRequest, facility: str, conf: WsSettings) -> Ticket:
        """Check the request and return the ticket it earns.

        Raises:
            BadRequest: malformed handshake, facility or query (4xx).
            Refused: origin or authorization refused (403).
        """
        stream = wants_event_stream(request.method or "", request.META)
        key = "" if stream else check_handshake(request.method or "", request.META)
        check_origin(request, conf, stream=stream)
        validate_facility(facility)
        if conf.facilities is not None and facility not in conf.facilities:
            raise BadRequest(f"unknown facility {facility!r}", status=404)
        asked = parse_query(request.META.get("QUERY_STRING", ""))
        recover = dict(asked.recover)
        if stream:
            # An event stream is one way: clients publish with a POST to the same URL.
            asked = replace(asked, publish=frozenset())
            last_event_id = request.META.get("HTTP_LAST_EVENT_ID")
            if last_event_id:
                recover = parse_event_id(last_event_id)  # the browser's reconnection

        subscribe: dict[str, str] = {}
        listed: list[str] = []  # the channels this connection is listed in (presence)
        for kind in sorted(asked.subscribe, key=lambda k: k.value):
            for audience in resolve(request, kind, "subscribe"):
                _require(conf, request, facility, "subscribe", audience)
                subscribe[audience.label] = channel_name(conf.prefix, facility, audience)
                if conf.presence and kind is not Kind.SESSION:
                    listed.append(subscribe[audience.label])
        publish: list[str] = []
        for kind in sorted(asked.publish, key=lambda k: k.value):
            for audience in resolve(request, kind, "publish"):
                _require(conf, request, facility, "publish", audience)
                publish.append(channel_name(conf.prefix, facility, audience))

        return Ticket(
            subscribe=subscribe,
            publish=tuple(publish),
            echo=asked.echo,
            latest=asked.latest,
            recover={label: p for label, p in recover.items() if label in subscribe},
            identity=client_identity(request),
            limits=conf.limits(),
            expires=time.time() + conf.ticket_ttl,
            stream=stream,
            key=key,
            prefix=conf.prefix,
            tags=connection_tags(request),
            max_age=conf.max_connection_age or 0.0,
            presence=tuple(listed),
            presence_events=tuple(listed) if asked.presence or facility in conf.presence_events else (),
            presence_user=_username_of(request),
            presence_info=info_for(request, conf) if listed else None,
            presence_ttl=conf.presence_ttl,
            presence_stream=conf.presence_stream_size,
        )

    def roster(self, request: HttpRequest, facility: str, conf: WsSettings) -> HttpResponse:
        """Answer ``GET <facility>?presence=<channel>`` with who is connected, as JSON.

        Only to clients that may subscribe to that channel (the same resolution and
        authorization hook as a subscription); anonymous connections are counted,
        never listed, and no session appears. Each read takes a token from the
        client's rate bucket (``RATE_LIMIT``, shared with its publishes): 429 when empty.

        Raises:
            BadRequest: bad facility or channel (400, 404).
            Refused: origin or rights (403).
        """
        from uwsgi_ws import presence as rosters
        from uwsgi_ws.exceptions import RedisUnavailable

        from .publishing import get_redis

        # A page's own fetch() sends no Origin on a GET, but Sec-Fetch-Site: same-origin.
        check_origin(request, conf, stream=True)
        validate_facility(facility)
        if conf.facilities is not None and facility not in conf.facilities:
            raise BadRequest(f"unknown facility {facility!r}", status=404)
        if not conf.presence:
            raise BadRequest("presence is turned off (DJANGO_WS['PRESENCE'])", status=404)
        label = request.GET.get("presence", "")
        channel = requested_channel(request, facility, label, conf)
        from uwsgi_ws.store import Store

        # A roster costs O(members): a client reads them from the same bucket it
        # publishes from, so that it cannot keep a worker and Redis busy with them.
        identity = client_identity(request)
        try:
            allowance = Store(get_redis()).allow(rate_key(conf.prefix, identity), rate=conf.rate, burst=conf.burst)
            if not allowance:
                response = _plain(429, "too many requests: slow down")
                response["Retry-After"] = str(max(1, math.ceil(allowance.retry_after)))
                return response
            roster = rosters.read(get_redis(), channel)
        except (RedisUnavailable, PublishError) as exc:
            logger.error("presence of %s not read: %s", label, exc)
            return _plain(503, "presence unavailable: try again")
        response = JsonResponse({"channel": channel_label(channel), **roster.to_dict()})
        response["Cache-Control"] = "no-store"
        return response

    def publish(self, request: HttpRequest, facility: str, conf: WsSettings) -> HttpResponse:
        """Publish the body of a POST to the audiences of its ``publish-*`` parameters.

        This is how event-stream clients (and any HTTP client) publish, with the same
        rights as a websocket's ``publish-*``, CSRF protection, and a rate limit per
        client shared by every process through Redis. The body is ``text/plain``
        (UTF-8), ``application/json`` (validated, delivered as the JSON value) or
        ``application/octet-stream`` (binary); form bodies are refused, so that a
        form's fields (its CSRF token among them) are never broadcast.

        Raises:
            BadRequest: bad facility, query, length or body (400, 404, 411, 413, 415).
            Refused: CSRF, origin or rights (403).
        """
        from django.middleware.csrf import CsrfViewMiddleware

        body_kind = _body_kind(request)
        body = _read_body(request, conf.max_message_size)
        refusal = CsrfViewMiddleware(self.get_response).process_view(request, _csrf_protected, (), {})
        if refusal is not None:
            raise Refused("CSRF verification failed")
        check_origin(request, conf)
        validate_facility(facility)
        if conf.facilities is not None and facility not in conf.facilities:
            raise BadRequest(f"unknown facility {facility!r}", status=404)
        sender = request.META.get("HTTP_X_DJANGOWS_SENDER", "")
        if sender and not _SENDER_RE.fullmatch(sender):
            raise BadRequest("X-DjangoWs-Sender must be the sender id of a ready event")
        asked = parse_query(request.META.get("QUERY_STRING", ""))
        if not asked.publish:
            raise BadRequest("say where to publish: publish-broadcast, publish-user, publish-group or publish-session")
        channels = []
        for kind in sorted(asked.publish, key=lambda k: k.value):
            for audience in resolve(request, kind, "publish"):
                _require(conf, request, facility, "publish", audience)
                channels.append(channel_name(conf.prefix, facility, audience))
        kind_, payload = _message(body_kind, body, conf.max_message_size)
        from uwsgi_ws.store import Store

        from .publishing import get_redis

        identity = client_identity(request)
        store = Store(get_redis(), publish_command=conf.publish_command)
        try:
            allowance = store.allow(rate_key(conf.prefix, identity), rate=conf.rate, burst=conf.burst)
            if not allowance:
                logger.debug("publish from %s refused: rate limit", identity)
                response = _plain(429, "too many messages: slow down")
                response["Retry-After"] = str(max(1, math.ceil(allowance.retry_after)))
                return response
            published = store.publish(
                channels,
                kind_,
                payload,
                sender=sender.encode("ascii"),
                history_size=conf.history_size,
                history_ttl=conf.history_ttl,
                history_max_bytes=conf.history_max_bytes,
            )
        except PublishError as exc:
            logger.error("publish from %s failed: %s", identity, exc)
            return _plain(503, "message not published: server unavailable")
        answer = [{"channel": channel_label(p.channel), "offset": p.offset, "epoch": p.epoch} for p in published]
        return JsonResponse({"published": answer})

    # ----------------------------------------------------------------- hand-over

    def hand_over(self, request: HttpRequest, token: str, conf: WsSettings) -> HttpResponse:
        """Pass the signed ticket to whatever serves the websocket."""
        if request.META.get(SERVER_KEY):
            request.META[TICKET_VAR] = token
            return _plain(202, "handed over to the websocket server")
        if conf.offload_to:
            address = next_address(conf)
            try:
                import uwsgi
            except ImportError:
                uwsgi = None
            if uwsgi is not None:
                uwsgi.add_var(TICKET_VAR, token)
                uwsgi.add_var(SLOT_VAR, thread_slot())
                uwsgi.add_var(OFFLOAD_VAR, address)
                # The response routes of uwsgi.ini.example replace this response; a client
                # only sees it if they are missing. Not a 5xx: Django would log every one.
                return _plain(202, "websocket offloading is not configured on this server")
        logger.error(
            "no websocket server for %s: set DJANGO_WS['OFFLOAD_TO'] under uWSGI, or serve "
            "the project with django_ws.wsgi in single-instance mode",
            request.path_info,
        )
        return _plain(503, "websockets are not available on this server")


def check_origin(request: HttpRequest, conf: WsSettings, *, stream: bool = False) -> None:
    """Refuse cross-site websocket hijacking: the Origin must be allowed.

    An origin is a scheme, a host and a port, all three compared, as Django's CSRF
    check does: the request's own origin (``https`` when ``request.is_secure()``,
    which honours ``SECURE_PROXY_SSL_HEADER``; the host from ``request.get_host()``),
    ``ALLOWED_ORIGINS`` and ``CSRF_TRUSTED_ORIGINS`` (wildcard subdomains included).
    ``null`` and anything that is not ``scheme://host[:port]`` are refused.

    Without an Origin: a request that a browser made for a page of another origin
    (``Sec-Fetch-Site: cross-site`` or ``same-site``) is refused; an event stream
    that the browser marks ``Sec-Fetch-Site: same-origin`` is the page's own
    ``EventSource`` (browsers send no Origin on a same-origin GET); anything else is
    accepted only under ``ALLOW_MISSING_ORIGIN``.

    Args:
        stream: the request asks for an event stream.

    Raises:
        Refused: the Origin is not allowed (or missing, when that is not allowed).
        BadRequest: the Host header is not in ``ALLOWED_HOSTS``.
    """
    header = request.META.get("HTTP_ORIGIN")
    if header is None:
        fetch_site = request.META.get("HTTP_SEC_FETCH_SITE", "").strip().lower()
        if fetch_site in _OTHER_SITES:
            raise Refused("a request made by a page of another origin must carry an Origin")
        if stream and fetch_site == "same-origin":
            return
        if conf.allow_missing_origin:
            return
        raise Refused("an Origin header is required")
    origin = parse_origin(header)
    if origin is None:
        raise Refused("malformed or opaque Origin: expected scheme://host[:port]")
    if conf.origin_allowed(origin):
        return
    own = _own_origin(request)
    if origin == own:
        return
    if origin.scheme == "https" and own.scheme == "http" and origin.host == own.host:
        logger.warning(
            "origin %s refused: Django sees this request as plain http; behind a proxy that terminates TLS, "
            "set SECURE_PROXY_SSL_HEADER",
            origin,
        )
    raise Refused("origin not allowed")


def _own_origin(request: HttpRequest) -> Origin:
    """The origin of the site the request was sent to, as a page of it would name it."""
    try:
        host = request.get_host()
    except DisallowedHost:
        raise BadRequest("invalid Host header") from None
    scheme = "https" if request.is_secure() else "http"
    name, port = split_host(host)
    return Origin(scheme, name, port if port is not None else (443 if scheme == "https" else 80))


def _body_kind(request: HttpRequest) -> str:
    """How a POST's body is published, from its Content-Type.

    Raises:
        BadRequest: 415 for any other type (forms among them) or charset.
    """
    kind = _BODY_KINDS.get(request.content_type or "")
    if kind is None:
        raise BadRequest(
            "send the message as text/plain (UTF-8), application/json or application/octet-stream",
            status=415,
        )
    charset = {k.lower(): v for k, v in request.content_params.items()}.get("charset")
    if kind != "binary" and charset is not None and charset.lower().replace("-", "") != "utf8":
        raise BadRequest("text and JSON messages must be UTF-8", status=415)
    return kind


def _read_body(request: HttpRequest, limit: int) -> bytes:
    """Read a POST's body, never more than ``limit`` bytes of it.

    The length is checked before anything is read: a malformed ``Content-Length``
    is a 400 and a larger one a 413. A chunked body (no length) is read as far as
    ``limit`` and one byte more, from servers that decode it (uWSGI, or any server
    that sets ``wsgi.input_terminated``), so a longer one is a 413 too; servers that
    cannot (Django's development server) answer 411.

    Raises:
        BadRequest: 400, 411 or 413 as above.
    """
    meta = request.META
    length = meta.get("CONTENT_LENGTH") or ""
    encoding = meta.get("HTTP_TRANSFER_ENCODING", "").strip().lower()
    if length:
        if encoding:
            raise BadRequest("Content-Length and Transfer-Encoding together are ambiguous: send one")
        if not _CONTENT_LENGTH_RE.fullmatch(length):
            raise BadRequest("malformed Content-Length")
        if len(length) > 18 or int(length) > limit:  # 18 digits: int() stays cheap
            raise BadRequest(f"message larger than {limit} bytes", status=413)
        return request.body
    if not encoding:
        return b""
    if encoding != "chunked":
        raise BadRequest("unsupported Transfer-Encoding: send a Content-Length", status=411)
    read = _chunk_reader(meta)
    if read is None:
        raise BadRequest("this server cannot read chunked bodies: send a Content-Length", status=411)
    parts, size = [], 0
    while size <= limit:
        try:
            part = read(limit + 1 - size)
        except OSError:
            raise BadRequest("malformed chunked body") from None
        if not part:
            break
        parts.append(part)
        size += len(part)
    if size > limit:
        raise BadRequest(f"message larger than {limit} bytes", status=413)
    return b"".join(parts)


def _chunk_reader(meta: dict[str, Any]) -> Callable[[int], bytes] | None:
    """A reader of the decoded body of a chunked request, or None if the server has none."""
    if meta.get("wsgi.input_terminated"):
        stream = meta["wsgi.input"]
        return lambda size: stream.read(min(size, 65536))  # type: ignore[no-any-return]
    try:
        import uwsgi
    except ImportError:
        return None
    chunked_read = getattr(uwsgi, "chunked_read", None)
    if chunked_read is None:
        return None
    # One decoded chunk per call (uWSGI bounds a chunk by its chunked-input-limit),
    # waiting at most 10 seconds for it.
    return lambda size: chunked_read(10)  # type: ignore[no-any-return]


def _message(kind: str, body: bytes, limit: int) -> tuple[bytes, bytes]:
    """Return (envelope kind, payload) for a POST's body of ``kind``.

    JSON is parsed, then published written compact as ``publish()`` writes it:
    browsers receive the value, and no raw CR (legal spacing in JSON) reaches an
    event stream, where it would end the line of data.

    Raises:
        BadRequest: text that is not UTF-8, JSON that is not valid (400), JSON that
            grows past ``limit`` when written compact (413).
    """
    if kind == "binary":
        return KIND_BINARY, body
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("text messages must be UTF-8; send binary as application/octet-stream") from None
    if kind == "text":
        return KIND_TEXT, body
    try:
        value = json.loads(text, parse_constant=_no_constant)
        envelope_kind, payload = encode_payload(value)
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError: a lone surrogate
        raise BadRequest("the body is not valid JSON") from None
    if len(payload) > limit:
        raise BadRequest(f"message larger than {limit} bytes", status=413)
    return envelope_kind, payload


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def resolve(request: HttpRequest, kind: Kind, action: str) -> list[Audience]:
    """Return the audiences of ``kind`` that belong to this request's client.

    Raises:
        Refused: the client has no user (user, group) or no session (session).
    """
    if kind is Kind.BROADCAST:
        return [Audience(Kind.BROADCAST)]
    if kind is Kind.SESSION:
        session = getattr(request, "session", None)
        key = session.session_key if session is not None else None
        if not key:
            raise Refused(f"{action}-session needs a session: the request carried no session cookie")
        # The key itself is a credential: outside Django the session is its digest.
        return [Audience(Kind.SESSION, session_digest(key))]
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        raise Refused(f"{action}-{kind.value} needs a logged-in user")
    if kind is Kind.USER:
        return [Audience(Kind.USER, user.get_username())]
    # Read from the database now, so a membership change applies to the next connection.
    names = user.groups.order_by("name").values_list("name", flat=True)
    return [Audience(Kind.GROUP, name) for name in names]


def _require(conf: WsSettings, request: HttpRequest, facility: str, action: str, audience: Audience) -> None:
    if not conf.authorize(request, facility, action, audience):
        raise Refused(f"not allowed to {action} to {audience.label}")


def connection_tags(request: HttpRequest) -> tuple[str, ...]:
    """Return what ``disconnect()`` can close this client's connection by.

    Its user, every group of its user (read now) and its session, whatever the
    connection subscribes to: a logout must close a broadcast-only socket too.
    """
    tags = []
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        tags.append(Audience(Kind.USER, user.get_username()).tag)
        tags += [Audience(Kind.GROUP, name).tag for name in user.groups.order_by("name").values_list("name", flat=True)]
    session = getattr(request, "session", None)
    key = session.session_key if session is not None else None
    if key:
        tags.append(Audience(Kind.SESSION, session_digest(key)).tag)
    return tuple(tags)


def _asks_roster(request: HttpRequest) -> bool:
    """Tell a presence GET (``?presence=<channel>``, nothing else) from a handshake."""
    if request.method != "GET" or request.META.get("HTTP_UPGRADE"):
        return False
    query = request.META.get("QUERY_STRING", "")
    return query.startswith("presence=") and "&" not in query


def _username_of(request: HttpRequest) -> str:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return ""
    return str(user.get_username())


def _csrf_protected(request: HttpRequest) -> HttpResponse:  # pragma: no cover - never called
    """Stands for a CSRF-protected view when the middleware checks a publishing POST."""
    raise AssertionError


def _plain(status: int, text: str) -> HttpResponse:
    response = HttpResponse(text + "\n", status=status, content_type="text/plain; charset=utf-8")
    if status == 426:
        # No "Upgrade" header: WSGI forbids hop-by-hop headers in applications.
        response["Sec-WebSocket-Version"] = "13"
    elif status == 405:
        response["Allow"] = "GET, POST"  # POST publishes
    return response
