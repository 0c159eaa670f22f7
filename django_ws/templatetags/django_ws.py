"""Template tags: ``{% load django_ws %}``.

``{% websocket_url "chat" "subscribe-broadcast&subscribe-user" %}``
    the full ``ws://`` or ``wss://`` URL of a facility with a query.
``{% websocket_script %}``
    the ``<script>`` tag of the browser client (it defines ``window.DjangoWs``).
"""

from __future__ import annotations

from typing import Any

from django import template
from django.templatetags.static import static
from django.utils.html import format_html

from ..context_processors import websocket_uri

register = template.Library()


@register.simple_tag(takes_context=True)
def websocket_url(context: Any, facility: str, query: str = "subscribe-broadcast") -> str:
    request = context.get("request")
    if request is None:
        raise template.TemplateSyntaxError(
            "websocket_url needs the request in the context: add "
            "'django.template.context_processors.request' to the context processors"
        )
    return websocket_uri(request) + facility + ("?" + query if query else "")


@register.simple_tag
def websocket_script() -> str:
    return format_html('<script src="{}"></script>', static("django_ws/django_ws.js"))
