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
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from urllib.parse import urlsplit

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
    parse_event_id,
    parse_query,
    sign_ticket,
    validate_facility,
    wants_event_stream,
)

from .conf import WsSettings, check_offload_sockets, get_settings

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
            return self.get_response(request)
        facility = request.path_info[len(conf.url) :]
        try:
            if request.method == "POST":
                return self.publish(request, facility, conf)
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
        if not stream:
            check_handshake(request.method or "", request.META)
        check_origin(request, conf)
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
        for kind in sorted(asked.subscribe, key=lambda k: k.value):
            for audience in resolve(request, kind, "subscribe"):
                _require(conf, request, facility, "subscribe", audience)
                subscribe[audience.label] = channel_name(conf.prefix, facility, audience)
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
            identity=_identity(request),
            limits=conf.limits(),
            expires=time.time() + conf.ticket_ttl,
            stream=stream,
        )

    def publish(self, request: HttpRequest, facility: str, conf: WsSettings) -> HttpResponse:
        """Publish the body of a POST to the audiences of its ``publish-*`` parameters.

        This is how event-stream clients (and any HTTP client) publish, with the same
        rights as a websocket's ``publish-*``, and CSRF protection.

        Raises:
            BadRequest: bad facility, query or body; Refused: CSRF, origin or rights.
        """
        from django.middleware.csrf import CsrfViewMiddleware

        if int(request.META.get("CONTENT_LENGTH") or 0) > conf.max_message_size:
            raise BadRequest(f"message larger than {conf.max_message_size} bytes", status=413)
        body = request.body  # read first: the CSRF check may parse a form body
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
        if request.content_type == "application/octet-stream":
            kind_, payload = KIND_BINARY, body
        else:
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("text messages must be UTF-8; send binary as application/octet-stream") from None
            kind_, payload = KIND_TEXT, body
        from uwsgi_ws.store import Store

        from .publishing import get_redis

        try:
            published = Store(get_redis(), publish_command=conf.publish_command).publish(
                channels,
                kind_,
                payload,
                sender=sender.encode("ascii"),
                history_size=conf.history_size,
                history_ttl=conf.history_ttl,
            )
        except PublishError as exc:
            logger.error("publish from %s failed: %s", _identity(request), exc)
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
            address = _next_address(conf.offload_to)
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


_turns: dict[tuple[str, ...], Iterator[str]] = {}


def _next_address(addresses: tuple[str, ...]) -> str:
    """The websocket instance for this hand-over: each of ``addresses`` in turn."""
    if len(addresses) == 1:
        return addresses[0]
    turn = _turns.get(addresses)
    if turn is None:
        turn = _turns.setdefault(addresses, itertools.cycle(addresses))
    return next(turn)  # itertools.cycle is atomic under the GIL


def check_origin(request: HttpRequest, conf: WsSettings) -> None:
    """Refuse cross-site websocket hijacking: the Origin must be allowed.

    Raises:
        Refused: the Origin is not allowed (or missing, when that is not allowed).
    """
    origin = request.META.get("HTTP_ORIGIN")
    if origin is None:
        if conf.allow_missing_origin:
            return
        raise Refused("an Origin header is required")
    origin = origin.strip().rstrip("/").lower()
    if conf.allowed_origins is not None:
        if "*" in conf.allowed_origins or origin in conf.allowed_origins:
            return
        raise Refused("origin not allowed")
    try:
        host = request.get_host().lower()
    except DisallowedHost:
        raise BadRequest("invalid Host header") from None
    if urlsplit(origin).netloc != host:
        raise Refused("origin not allowed")


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
        return [Audience(Kind.SESSION, key)]
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


def _identity(request: HttpRequest) -> str:
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    return "anonymous"


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
