"""The template tags as the README uses them: rendered templates, and their URLs on a real server."""

from __future__ import annotations

import re

import pytest
from django.template import Context, Template
from django.test import RequestFactory

from tests.conftest import WS
from uwsgi_ws.protocol import parse_query

SCRIPT = '{% load django_ws %}<script>const url = "{% websocket_url facility query %}";</script>'


def render(host: str, facility: str, query: str, *, secure: bool = False) -> str:
    request = RequestFactory().get("/", HTTP_HOST=host, secure=secure)
    return Template(SCRIPT).render(Context({"request": request, "facility": facility, "query": query}))


def url_in(html: str) -> str:
    [url] = re.findall(r'const url = "([^"]*)";', html)
    return url


def test_websocket_url_in_a_script_string_keeps_its_ampersands(project):
    html = render("127.0.0.1", "chat", "subscribe-broadcast&subscribe-user&echo")
    assert url_in(html) == "ws://127.0.0.1/ws/chat?subscribe-broadcast&subscribe-user&echo"
    request = parse_query(url_in(html).split("?", 1)[1])
    assert sorted(a.value for a in request.subscribe) == ["broadcast", "user"]
    assert request.echo is True


def test_websocket_url_cannot_end_the_string_or_the_script(project):
    html = render("127.0.0.1", "chat", "subscribe-broadcast&x=\"</script><script>alert('1')")
    assert url_in(html) == "ws://127.0.0.1/ws/chat?subscribe-broadcast&x=%22%3C/script%3E%3Cscript%3Ealert(%271%27)"
    assert html.count("</script>") == 1


def test_websocket_url_rendered_for_a_real_server_subscribes_to_every_audience(project, offload_stack, facility):
    """The rendered URL, as a page's script would pass it on, reaches the server whole."""
    alice = project.cookie("alice")
    html = render(f"127.0.0.1:{offload_stack.port}", facility, "subscribe-broadcast&subscribe-user")
    ws = WS(url_in(html), session=alice)
    try:
        frames = ws.ready()
        assert sorted(f["channel"] for f in frames if f["type"] == "subscribed") == ["broadcast", "user"]
    finally:
        ws.close()


@pytest.mark.parametrize("secure,scheme", [(False, "ws"), (True, "wss")])
def test_websocket_url_follows_the_request_scheme(project, secure, scheme):
    html = render("127.0.0.1", "chat", "", secure=secure)
    assert url_in(html) == f"{scheme}://127.0.0.1/ws/chat"
