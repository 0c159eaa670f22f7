"""Template tags: ``{% load django_ws %}``.

``{% websocket_url "chat" "subscribe-broadcast&subscribe-user" %}``
    the full ``ws://`` or ``wss://`` URL of a facility with a query, fit to stand
    as it is in a JavaScript string, an HTML attribute or text (see
    :func:`websocket_url`).
``{% websocket_script %}``
    the ``<script>`` tag of the browser client (it defines ``window.DjangoWs``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from django import template
from django.templatetags.static import static
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from ..context_processors import websocket_uri

register = template.Library()

# What a URL may keep as it is: letters, digits, "-._~", "%" (escapes already made)
# and the reserved characters a URL needs, except the quote "'". Everything else
# (quotes, "<", ">", "\\", spaces, non-ASCII) is percent-encoded.
_URL_SAFE = ":/?#[]@!$&()*+,;=%"


@register.simple_tag(takes_context=True)
def websocket_url(context: Any, facility: str, query: str = "subscribe-broadcast") -> SafeString:
    """Return the websocket URL of ``facility`` with ``query``, safe in any template context.

    The URL is not HTML-escaped, since its ``&`` must reach the server as ``&`` when
    the tag stands in a ``<script>`` string (escaped, it arrives as ``&amp;`` and the
    server refuses the query with 400). It is made safe instead by percent-encoding
    every character that could end a string, an attribute or a tag.
    """
    request = context.get("request")
    if request is None:
        raise template.TemplateSyntaxError(
            "websocket_url needs the request in the context: add "
            "'django.template.context_processors.request' to the context processors"
        )
    url = websocket_uri(request) + facility + ("?" + query if query else "")
    return mark_safe(quote(url, safe=_URL_SAFE))  # noqa: S308 - nothing left to escape


@register.simple_tag
def websocket_script() -> str:
    return format_html('<script src="{}"></script>', static("django_ws/django_ws.js"))
