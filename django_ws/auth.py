"""Authorization of subscriptions and client publishing.

The hook named by ``DJANGO_WS["AUTHORIZE"]`` is called once per channel a
connection asks for, when it connects, with the request (``request.user`` and
``request.session`` are available), the facility, the action (``"subscribe"`` or
``"publish"``) and the :class:`~uwsgi_ws.protocol.Audience`. It returns True to
allow. One refusal refuses the whole connection with HTTP 403.

Users only ever reach their own user channel, their own groups' channels and their
own session's channel: the hook cannot widen that, only narrow it.
"""

from __future__ import annotations

from django.http import HttpRequest

from uwsgi_ws.protocol import Audience

from .conf import get_settings


def default_authorize(request: HttpRequest, facility: str, action: str, audience: Audience) -> bool:
    """Allow every subscription; allow publishing to authenticated users only, and
    only to the audiences listed in ``DJANGO_WS["CLIENT_PUBLISH"]`` (none by default).
    """
    if action == "subscribe":
        return True
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return False
    return audience.kind.value in get_settings().client_publish
