"""A hostile page's reach: the Origin check (scheme, host and port) of websockets,
event streams and publishing POSTs.

A cross-origin page can open a websocket to any server with the visitor's cookies
(websockets have no CORS), so the Origin is the defence against cross-site websocket
hijacking. Against real servers (every mode; one behind a real nginx terminating TLS;
one with CSRF_TRUSTED_ORIGINS and ALLOW_MISSING_ORIGIN off), with RequestFactory for
the rules themselves, and in a real browser for what browsers send.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import ssl
import subprocess
import uuid

import pytest
from django.test import RequestFactory, override_settings

import django_ws
from tests.conftest import free_port, start_stack, stop, wait_for

MISSING = None
TOKEN = "c" * 32  # the CSRF secret of the POSTs below (cookie and header)
STATUS_OK = {"ws": 101, "sse": 200, "post": 200}


@pytest.fixture(scope="module")
def poster(project):
    """A user of its own (its own rate bucket), logged in: its session key."""
    from django.contrib.auth.models import User
    from django.test import Client

    user = User.objects.create_user("origin-" + uuid.uuid4().hex[:8])
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def ask(
    port: int,
    kind: str,
    facility: str,
    origin: str | None,
    *,
    session: str | None = None,
    headers: dict[str, str] | None = None,
    tls: bool = False,
) -> int:
    """Send a websocket handshake, an event-stream request or a publishing POST; return the status."""
    sent = dict(headers or {})
    if origin is not MISSING:
        sent["Origin"] = origin
    if session:
        sent["Cookie"] = f"sessionid={session}; csrftoken={TOKEN}"
    body = None
    if kind == "ws":
        method, path = "GET", f"/ws/{facility}?subscribe-broadcast"
        key = base64.b64encode(os.urandom(16)).decode()
        sent.update({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"})
        sent["Sec-WebSocket-Key"] = key
    elif kind == "sse":
        method, path = "GET", f"/ws/{facility}?subscribe-broadcast"
        sent["Accept"] = "text/event-stream"
    else:
        method, path, body = "POST", f"/ws/{facility}?publish-broadcast", b"hello"
        sent.update({"Content-Type": "text/plain; charset=utf-8", "X-CSRFToken": TOKEN})
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the test's own self-signed certificate
        conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", port, timeout=15, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=sent)
        return conn.getresponse().status
    finally:
        conn.close()


def expect(kind: str, allowed: bool) -> int:
    return STATUS_OK[kind] if allowed else 403


# --------------------------------------------------------------------------- every server

# (Origin, allowed for websockets and event streams, allowed for POSTs); {port} is
# the server's, {other} another port. POSTs also pass Django's CSRF check, which
# compares the Origin's exact text: an uppercase one, which no browser sends, fails it.
SAME_SITE_CASES = [
    ("http://127.0.0.1:{port}", True, True),
    ("HTTP://127.0.0.1:{port}", True, False),
    ("https://127.0.0.1:{port}", False, False),
    ("evil://127.0.0.1:{port}", False, False),
    ("file://127.0.0.1:{port}", False, False),
    ("ws://127.0.0.1:{port}", False, False),
    ("http://127.0.0.1:{other}", False, False),
    ("http://127.0.0.1", False, False),
    ("http://127.0.0.1:{port}/", False, False),
    ("http://127.0.0.1:{port}/chat", False, False),
    ("http://user@127.0.0.1:{port}", False, False),
    ("null", False, False),
    ("", False, False),
    ("http://evil.example", False, False),
    ("http://127.0.0.1:{port}.evil.example", False, False),
]


@pytest.mark.parametrize("kind", ["ws", "sse", "post"])
def test_scheme_host_and_port_are_compared(stack, facility, poster, kind):
    other = stack.port + 1 if stack.port < 65535 else stack.port - 1
    refused_wrongly, accepted_wrongly = [], []
    for template, allowed, post_allowed in SAME_SITE_CASES:
        origin = template.format(port=stack.port, other=other)
        wanted = expect(kind, post_allowed if kind == "post" else allowed)
        got = ask(stack.port, kind, facility, origin, session=poster)
        if got != wanted:
            (accepted_wrongly if wanted == 403 else refused_wrongly).append((origin, got))
    assert not accepted_wrongly and not refused_wrongly, f"accepted: {accepted_wrongly}, refused: {refused_wrongly}"


@pytest.mark.parametrize("kind", ["ws", "sse", "post"])
def test_a_request_made_for_another_site_without_origin_is_refused(stack, facility, poster, kind):
    """No Origin, but the browser says another site's page made the request (an <img>,
    a no-cors fetch): nothing of ours works that way, so it is refused even though
    ALLOW_MISSING_ORIGIN is on, as it is in the example."""
    for site in ("cross-site", "same-site"):
        assert ask(stack.port, kind, facility, MISSING, session=poster, headers={"Sec-Fetch-Site": site}) == 403
    assert ask(stack.port, kind, facility, MISSING, session=poster) == STATUS_OK[kind]


# --------------------------------------------------------------------------- settings of a real site


@pytest.fixture(scope="module")
def strict_stack(project, tmp_path_factory):
    """A front behind a TLS proxy (SECURE_PROXY_SSL_HEADER), trusting some other origins
    (CSRF_TRUSTED_ORIGINS, with a wildcard), without ALLOW_MISSING_ORIGIN."""
    stack = start_stack(
        "offload",
        project,
        tmp_path_factory.mktemp("strict"),
        EXAMPLE_BEHIND_TLS_PROXY="1",
        DJANGO_CSRF_TRUSTED_ORIGINS="http://*.trusted.test,https://partner.test:8443",
        DJANGO_WS_ALLOW_MISSING_ORIGIN="0",
    )
    yield stack
    for proc in stack.procs:
        stop(proc)


HTTPS = {"X-Forwarded-Proto": "https"}


@pytest.mark.parametrize("kind", ["ws", "sse", "post"])
@pytest.mark.parametrize(
    "origin,headers,allowed",
    [
        ("https://127.0.0.1:{port}", HTTPS, True),
        ("http://127.0.0.1:{port}", HTTPS, False),
        ("https://127.0.0.1:{port}", {}, False),
        ("http://127.0.0.1:{port}", {}, True),
        ("http://chat.trusted.test", {}, True),
        ("http://trusted.test", {}, True),
        ("http://a.b.trusted.test", {}, True),
        ("https://chat.trusted.test", {}, False),
        ("http://chat.trusted.test:8080", {}, False),
        ("http://eviltrusted.test", {}, False),
        ("http://trusted.test.evil.example", {}, False),
        ("https://partner.test:8443", {}, True),
        ("https://partner.test", {}, False),
    ],
)
def test_secure_proxy_header_and_trusted_origins(strict_stack, facility, poster, kind, origin, headers, allowed):
    origin = origin.format(port=strict_stack.port)
    assert ask(strict_stack.port, kind, facility, origin, session=poster, headers=headers) == expect(kind, allowed)


def test_an_https_page_refused_for_want_of_the_proxy_header_is_explained_in_the_log(strict_stack, facility):
    def hints() -> int:
        return strict_stack.log.read_text().count("set SECURE_PROXY_SSL_HEADER")

    before = hints()
    for origin in (
        f"https://127.0.0.1:{strict_stack.port}",
        "https://evil.example",
        f"https://127.0.0.1:{strict_stack.port}",
    ):
        assert ask(strict_stack.port, "ws", facility, origin) == 403
    # One worker thread logs in order: once the last hint is written, the others are too.
    wait_for(lambda: hints() >= before + 2, what="the log's hints")
    assert hints() == before + 2  # for the site's own host, not for another one
    assert not [line for line in strict_stack.log.read_text().splitlines() if "evil.example refused" in line]


@pytest.mark.parametrize(
    "kind,headers,allowed",
    [
        ("ws", {}, False),
        ("ws", {"Sec-Fetch-Site": "same-origin"}, False),  # browsers always send an Origin on websockets
        ("sse", {}, False),
        ("sse", {"Sec-Fetch-Site": "same-origin"}, True),  # the page's own EventSource
        ("sse", {"Sec-Fetch-Site": "cross-site"}, False),
        ("sse", {"Sec-Fetch-Site": "same-site"}, False),
        ("sse", {"Sec-Fetch-Site": "none"}, False),
        ("post", {}, False),
        ("post", {"Sec-Fetch-Site": "same-origin"}, False),  # a browser's POST carries an Origin
    ],
)
def test_a_missing_origin_when_it_is_not_allowed(strict_stack, facility, poster, kind, headers, allowed):
    assert ask(strict_stack.port, kind, facility, MISSING, session=poster, headers=headers) == expect(kind, allowed)


# --------------------------------------------------------------------------- a real nginx with TLS


@pytest.fixture(scope="module")
def tls_nginx(strict_stack, tmp_path_factory):
    """The deployment guide's nginx block (docs/howto/deploy.md), terminating TLS (a
    self-signed certificate) in front of the strict stack: X-Forwarded-Proto comes from
    nginx, as in production."""
    from tests.test_nginx import readme_snippet, running_nginx

    tmp = tmp_path_factory.mktemp("tls-nginx")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    port = free_port()
    server = readme_snippet()
    server = server.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{strict_stack.port};")
    server = server.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    server = server.replace("server_name example.com;", "server_name 127.0.0.1;")
    server = server.replace(
        "# ssl_certificate / ssl_certificate_key ...", f"ssl_certificate {cert};\n    ssl_certificate_key {key};"
    )
    assert f"ssl_certificate {cert};" in server
    with running_nginx(server, port, tmp):
        yield port


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["ws", "sse", "post"])
def test_an_https_page_behind_nginx(tls_nginx, facility, poster, kind):
    own = f"https://127.0.0.1:{tls_nginx}"
    assert ask(tls_nginx, kind, facility, own, session=poster, tls=True) == STATUS_OK[kind]
    for other in (f"http://127.0.0.1:{tls_nginx}", "https://127.0.0.1", "https://evil.example"):
        assert ask(tls_nginx, kind, facility, other, session=poster, tls=True) == 403, other


@pytest.mark.timeout(120)
def test_a_websocket_works_end_to_end_through_tls(tls_nginx, facility):
    from tests.conftest import WS

    ws = WS(
        f"wss://127.0.0.1:{tls_nginx}/ws/{facility}?subscribe-broadcast",
        origin=f"https://127.0.0.1:{tls_nginx}",
        sslopt={"cert_reqs": ssl.CERT_NONE, "check_hostname": False},
    )
    ws.ready()
    django_ws.publish(facility, "over wss", broadcast=True)
    assert ws.next()["data"] == "over wss"
    ws.close()


# --------------------------------------------------------------------------- the rules, with RequestFactory

SITE = "127.0.0.1:8000"


def _authorize(rf, *, origin=MISSING, stream=False, **meta):
    from django.contrib.auth.models import AnonymousUser

    from django_ws.conf import get_settings
    from django_ws.middleware import WebSocketMiddleware

    headers = {"HTTP_HOST": SITE, **meta}
    if origin is not MISSING:
        headers["HTTP_ORIGIN"] = origin
    if stream:
        headers["HTTP_ACCEPT"] = "text/event-stream"
    else:
        headers.update(
            HTTP_UPGRADE="websocket",
            HTTP_CONNECTION="Upgrade",
            HTTP_SEC_WEBSOCKET_VERSION="13",
            HTTP_SEC_WEBSOCKET_KEY="dGhlIHNhbXBsZSBub25jZQ==",
        )
    request = rf.get("/ws/f?subscribe-broadcast", **headers)
    request.user = AnonymousUser()
    request.session = type("S", (), {"session_key": None})()
    return WebSocketMiddleware(lambda r: None).authorize(request, "f", get_settings())


def _allowed(rf, **kwargs) -> bool:
    from uwsgi_ws.exceptions import Refused

    try:
        _authorize(rf, **kwargs)
    except Refused:
        return False
    return True


@pytest.fixture
def rf(project):
    return RequestFactory()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("template,allowed,_", SAME_SITE_CASES)
def test_rules_for_the_own_origin(rf, stream, template, allowed, _):
    origin = template.format(port=8000, other=8001)
    assert _allowed(rf, origin=origin, stream=stream) is allowed


@pytest.mark.parametrize(
    "origin,meta,allowed",
    [
        ("https://example.com", {"HTTP_HOST": "example.com", "HTTP_X_FORWARDED_PROTO": "https"}, True),
        ("https://example.com:443", {"HTTP_HOST": "example.com", "HTTP_X_FORWARDED_PROTO": "https"}, True),
        ("https://example.com", {"HTTP_HOST": "example.com:443", "HTTP_X_FORWARDED_PROTO": "https"}, True),
        ("http://example.com", {"HTTP_HOST": "example.com", "HTTP_X_FORWARDED_PROTO": "https"}, False),
        ("https://example.com", {"HTTP_HOST": "example.com"}, False),
        ("http://example.com", {"HTTP_HOST": "example.com"}, True),
        ("http://example.com:8080", {"HTTP_HOST": "example.com:8080"}, True),
        ("http://[::1]:8000", {"HTTP_HOST": "[::1]:8000"}, True),
        ("http://[::1]:8001", {"HTTP_HOST": "[::1]:8000"}, False),
    ],
)
def test_rules_behind_a_tls_proxy(rf, origin, meta, allowed):
    with override_settings(
        SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"), ALLOWED_HOSTS=["example.com", "[::1]"]
    ):
        assert _allowed(rf, origin=origin, **meta) is allowed


@pytest.mark.parametrize(
    "origin,allowed",
    [
        ("https://app.example.org", True),
        ("http://app.example.org", False),
        ("https://app.example.org:444", False),
        ("https://a.partner.test", True),
        ("https://partner.test", True),
        ("http://a.partner.test", False),
        ("http://127.0.0.1:8000", True),  # the own origin stays allowed
        ("https://evil.example", False),
    ],
)
def test_rules_for_allowed_and_trusted_origins(rf, origin, allowed):
    from django.conf import settings

    with override_settings(
        DJANGO_WS={**settings.DJANGO_WS, "ALLOWED_ORIGINS": ["https://app.example.org"]},
        CSRF_TRUSTED_ORIGINS=["https://*.partner.test"],
    ):
        assert _allowed(rf, origin=origin) is allowed


@pytest.mark.parametrize(
    "origin,allowed", [("http://evil.example", True), ("null", False), ("http://127.0.0.1:8000/", False), ("", False)]
)
def test_any_origin_still_means_a_real_one(rf, origin, allowed):
    from django.conf import settings

    with override_settings(DJANGO_WS={**settings.DJANGO_WS, "ALLOWED_ORIGINS": ["*"]}):
        assert _allowed(rf, origin=origin) is allowed


@pytest.mark.parametrize(
    "stream,fetch_site,allow_missing,allowed",
    [
        (False, None, True, True),
        (False, None, False, False),
        (False, "same-origin", False, False),
        (True, None, True, True),
        (True, None, False, False),
        (True, "same-origin", False, True),
        (True, "SAME-ORIGIN", False, True),
        (True, "none", False, False),
        (True, "cross-site", True, False),
        (True, "same-site", True, False),
        (False, "cross-site", True, False),
    ],
)
def test_rules_for_a_missing_origin(rf, stream, fetch_site, allow_missing, allowed):
    from django.conf import settings

    meta = {"HTTP_SEC_FETCH_SITE": fetch_site} if fetch_site else {}
    with override_settings(DJANGO_WS={**settings.DJANGO_WS, "ALLOW_MISSING_ORIGIN": allow_missing}):
        assert _allowed(rf, stream=stream, **meta) is allowed


def _post_status(rf, poster_user, origin) -> int:
    from django_ws.middleware import WebSocketMiddleware

    rf.cookies["csrftoken"] = TOKEN
    request = rf.post(
        "/ws/f?publish-broadcast",
        data=b"hi",
        content_type="text/plain",
        HTTP_HOST=SITE,
        HTTP_ORIGIN=origin,
        HTTP_X_CSRFTOKEN=TOKEN,
    )
    request.user = poster_user
    request.session = type("S", (), {"session_key": None})()
    return WebSocketMiddleware(lambda r: None)(request).status_code


@pytest.mark.parametrize(
    "origin,allowed",
    [
        ("http://127.0.0.1:8000", True),
        ("https://127.0.0.1:8000", False),
        ("null", False),
        ("evil://127.0.0.1:8000", False),
    ],
)
def test_rules_for_posts(rf, project, origin, allowed):
    from django.contrib.auth.models import User

    user, _ = User.objects.get_or_create(username="origin-rf-poster")
    assert _post_status(rf, user, origin) == (200 if allowed else 403)


# --------------------------------------------------------------------------- a real browser

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.timeout(180)
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")
def test_what_a_browser_sends_and_what_another_origin_gets(strict_stack):
    """With ALLOW_MISSING_ORIGIN off: the page's own EventSource (no Origin, by the Fetch
    standard; Sec-Fetch-Site: same-origin) works, its websocket and its send() POSTs
    too; a page of another origin (localhost instead of 127.0.0.1) gets neither a
    websocket nor an event stream."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    from tests.test_browser import connected, logged_in, shows

    base = strict_stack.http("")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = logged_in(browser, base, "alice")  # the websocket transport: connected
            assert page.evaluate("window.chatConnection.transport") == "websocket"

            sent: list[dict[str, str]] = []
            page.on(
                "request",
                lambda r: sent.append(r.all_headers()) if "/ws/chat" in r.url and r.method == "GET" else None,
            )
            page.goto(base + "/?transport=sse")
            connected(page)
            assert page.evaluate("window.chatConnection.transport") == "sse"
            stream = [h for h in sent if "text/event-stream" in h.get("accept", "")]
            assert stream and "origin" not in stream[0] and stream[0].get("sec-fetch-site") == "same-origin", stream
            django_ws.publish("chat", {"from": "server", "text": "to a same-origin stream"}, broadcast=True)
            shows(page, "public", "to a same-origin stream")
            page.evaluate("""() => {
                window.sendErrors = [];
                window.poster = new DjangoWs.Connection(
                    {url: window.chatConnection.url, subscribe: [], publish: ['broadcast']}, {transport: 'sse'});
                window.poster.on('error', (e) => window.sendErrors.push(e));
                window.poster.send('sent from the page');
            }""")
            shows(page, "public", "sent from the page")
            assert page.evaluate("window.sendErrors") == []

            refusals = len(re.findall("origin not allowed", strict_stack.log.read_text()))
            other = browser.new_context().new_page()
            other.goto(f"http://localhost:{strict_stack.port}/login/")
            outcome = other.evaluate(
                """(target) => new Promise((resolve) => {
                    const result = {};
                    const done = () => { if ('ws' in result && 'sse' in result) resolve(result); };
                    const ws = new WebSocket('ws://' + target + '/ws/chat?subscribe-broadcast');
                    ws.onopen = () => { result.ws = 'open'; done(); };
                    ws.onclose = () => { if (!('ws' in result)) { result.ws = 'closed'; done(); } };
                    const es = new EventSource('http://' + target + '/ws/chat?subscribe-broadcast',
                                               {withCredentials: true});
                    es.onopen = () => { result.sse = 'open'; es.close(); done(); };
                    es.onerror = () => { if (!('sse' in result)) { result.sse = 'failed'; es.close(); done(); } };
                })""",
                f"127.0.0.1:{strict_stack.port}",
            )
            assert outcome == {"ws": "closed", "sse": "failed"}
            # Both were refused by the Origin check (not merely unreadable for want of CORS).
            wait_for(
                lambda: len(re.findall("origin not allowed", strict_stack.log.read_text())) >= refusals + 2,
                what="two refusals in the log",
            )
        finally:
            browser.close()
