"""System checks: misconfiguration is reported at startup, with ids."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register
from django.core.exceptions import ImproperlyConfigured

from .conf import TicketSecretError, check_offload_sockets, get_settings

MIDDLEWARE_PATH = "django_ws.middleware.WebSocketMiddleware"
NEEDED_BEFORE = (
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
)


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    try:
        conf = get_settings()
    except TicketSecretError as exc:
        return [
            Error(
                str(exc),
                hint="Set DJANGO_WS_SECRET (or DJANGO_WS['TICKET_SECRET']) to at least 32 random bytes, the "
                "value the websocket instance gets as DJANGO_WS_SECRET; without OFFLOAD_TO it may stay unset.",
                id="django_ws.E003",
            )
        ]
    except ImproperlyConfigured as exc:
        return [Error(str(exc), id="django_ws.E001")]
    problems: list[Any] = []
    try:
        check_offload_sockets(conf)
    except ImproperlyConfigured as exc:
        problems.append(
            Error(
                str(exc),
                hint="The front hands websockets (cookies included) to whatever listens there: keep the socket "
                "in a directory of the server's user with mode 0700.",
                id="django_ws.E004",
            )
        )
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    if MIDDLEWARE_PATH not in middleware:
        problems.append(
            Warning(
                f"{MIDDLEWARE_PATH} is not in MIDDLEWARE: websocket handshakes will not be answered",
                hint="Add it after SessionMiddleware and AuthenticationMiddleware.",
                id="django_ws.W001",
            )
        )
    else:
        position = middleware.index(MIDDLEWARE_PATH)
        for needed in NEEDED_BEFORE:
            if needed in middleware and middleware.index(needed) > position:
                problems.append(
                    Error(
                        f"{MIDDLEWARE_PATH} must come after {needed} in MIDDLEWARE",
                        hint="It needs request.session and request.user to resolve channels.",
                        id="django_ws.E002",
                    )
                )
    installed = list(getattr(settings, "INSTALLED_APPS", []))
    if (
        "django_ws" in installed
        and "django.contrib.staticfiles" in installed
        and installed.index("django_ws") > installed.index("django.contrib.staticfiles")
    ):
        problems.append(
            Warning(
                "django_ws comes after django.contrib.staticfiles in INSTALLED_APPS: "
                "runserver will not serve websockets",
                hint="Move 'django_ws' above 'django.contrib.staticfiles'; its runserver serves static files too.",
                id="django_ws.W002",
            )
        )
    if conf.client_publish and conf.facilities is None:
        problems.append(
            Error(
                "DJANGO_WS['CLIENT_PUBLISH'] lets browsers publish, but DJANGO_WS['FACILITIES'] is not set: "
                "any client may then create any number of facilities, each with its own history in Redis",
                hint="List the facilities clients may use in DJANGO_WS['FACILITIES'], as names or glob "
                "patterns (e.g. ['chat', 'room-*']).",
                id="django_ws.E005",
            )
        )
    return problems
