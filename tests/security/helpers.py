"""What the attack tests share: tickets as Django really signs them, plain HTTP."""

from __future__ import annotations

import base64
import http.client
import json
import secrets
from typing import Any
from urllib.parse import urlencode

TICKET_VAR = "DJANGO_WS_TICKET"


def django_ticket(path: str, *, session: str | None = None, key: str = "", stream: bool = False) -> str:
    """Return the ticket the middleware signs for a handshake (in this process's Django).

    The request goes through the whole middleware stack of the example project, as
    on the front; instead of handing it over, the middleware leaves the ticket in the
    request (the in-process server's way), where this reads it.
    """
    from django.test import Client

    client = Client()
    if session:
        client.cookies["sessionid"] = session
    extra: dict[str, Any] = {"HTTP_HOST": "127.0.0.1", "django_ws.server": "test"}
    if stream:
        extra["HTTP_ACCEPT"] = "text/event-stream"
    else:
        extra.update(
            HTTP_UPGRADE="websocket",
            HTTP_CONNECTION="Upgrade",
            HTTP_SEC_WEBSOCKET_VERSION="13",
            HTTP_SEC_WEBSOCKET_KEY=key,
        )
    response = client.get(path, **extra)
    assert response.status_code == 202, (response.status_code, response.content)
    return response.wsgi_request.META[TICKET_VAR]


def ticket_text(token: str) -> str:
    """Return everything a ticket carries, decoded, as text."""
    body = token.split(".", 1)[0]
    return json.dumps(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


class Browser:
    """A cookie-keeping HTTP client for the front (what a browser does, minus scripts)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {"csrftoken": secrets.token_hex(16)}

    def request(self, method: str, path: str, form: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        headers = {"Host": f"127.0.0.1:{self.port}", "Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if form is not None:
            # Django accepts the unmasked CSRF secret equal to the cookie's.
            body = urlencode({**form, "csrfmiddlewaretoken": self.cookies["csrftoken"]})
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        for header, value in response.getheaders():
            if header.lower() == "set-cookie":
                name, _, rest = value.partition("=")
                cookie_value = rest.split(";", 1)[0]
                if cookie_value and "expires=Thu, 01 Jan 1970" not in value:
                    self.cookies[name] = cookie_value
                else:
                    self.cookies.pop(name, None)
        conn.close()
        return response.status, data

    def login(self, username: str, password: str = "pw") -> str:
        status, _ = self.request("POST", "/login/", {"username": username, "password": password})
        assert status == 302, status
        return self.cookies["sessionid"]

    def logout(self) -> None:
        status, _ = self.request("POST", "/logout/", {})
        assert status == 302, status
