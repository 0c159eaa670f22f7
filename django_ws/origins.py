"""Origins: what an ``Origin`` header names, and the patterns that allow one.

An origin is a scheme, a host and a port (RFC 6454); two pages share an origin only
if all three are equal, so ``https://example.com``, ``http://example.com`` and
``http://example.com:8080`` are three different sites. Browsers send the origin
serialised as ``scheme://host[:port]``, lowercase, without the scheme's default port
and without a path. This module parses that form strictly: anything else (a path,
a trailing slash, user information, ``null``, which browsers send for sandboxed
frames and local files whose real site cannot be known) is not an origin at all,
and the middleware refuses it.

Settings name origins the same way, or with a wildcard for the subdomains of a host,
as Django's ``CSRF_TRUSTED_ORIGINS`` does: ``https://*.example.com`` allows
``https://example.com`` and every ``https://<sub>.example.com``, on the default port.
Nothing here imports Django.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Origin", "OriginPattern", "parse_origin", "parse_origin_pattern"]

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_SCHEME = r"(?P<scheme>[a-z][a-z0-9+.-]*)"
# A DNS name or IPv4 address (letters, digits, '-', '.', '_'), or an IPv6 literal.
_HOST = r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?)"
_PORT = r"(?::(?P<port>[1-9][0-9]{0,4}))?"  # written as browsers do: no leading zero
_ORIGIN_RE = re.compile(_SCHEME + "://" + _HOST + _PORT)
_PATTERN_RE = re.compile(_SCHEME + "://" + r"(?P<wildcard>\*\.)?" + _HOST + _PORT)


@dataclass(frozen=True)
class Origin:
    """A web origin. ``port`` is explicit, or the scheme's default (None if it has none)."""

    scheme: str
    host: str
    port: int | None

    def __str__(self) -> str:
        if self.port is None or self.port == DEFAULT_PORTS.get(self.scheme):
            return f"{self.scheme}://{self.host}"
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class OriginPattern:
    """An allowed origin from the settings; ``subdomains`` also allows those of ``host``.

    ``any`` (the setting ``"*"``) allows every origin that parses.
    """

    scheme: str = ""
    host: str = ""
    port: int | None = None
    subdomains: bool = False
    any: bool = False

    def matches(self, origin: Origin) -> bool:
        """Tell whether ``origin`` is allowed by this pattern."""
        if self.any:
            return True
        if origin.scheme != self.scheme or origin.port != self.port:
            return False
        if origin.host == self.host:
            return True
        return self.subdomains and origin.host.endswith("." + self.host)


def _port(scheme: str, digits: str | None) -> int | None | bool:
    """The port of a parsed origin; False when the digits are not a port."""
    if digits is None:
        return DEFAULT_PORTS.get(scheme)
    port = int(digits)
    return port if 0 < port <= 65535 else False


def parse_origin(text: str) -> Origin | None:
    """Return the origin an ``Origin`` header names, or None if it names none.

    Scheme and host compare case-insensitively (they are case-insensitive in URLs),
    so they are lowercased; anything but ``scheme://host[:port]`` is refused,
    ``null`` included.
    """
    if not text.isascii():
        return None
    match = _ORIGIN_RE.fullmatch(text.lower())
    if match is None:
        return None
    port = _port(match["scheme"], match["port"])
    if port is False:
        return None
    return Origin(match["scheme"], match["host"], port)  # type: ignore[arg-type]


def parse_origin_pattern(text: str) -> OriginPattern:
    """Parse an allowed origin from the settings: ``*``, an origin, or ``scheme://*.host``.

    A trailing ``/`` is forgiven here (it is a common way to write a site in a
    setting), never in a request's header.

    Raises:
        ValueError: ``text`` is none of these; the message says what is expected.
    """
    if not isinstance(text, str):
        text = repr(text)  # refused below, with the message that says what to write
    if text == "*":
        return OriginPattern(any=True)
    cleaned = text.strip().lower()
    cleaned = cleaned[:-1] if cleaned.endswith("/") else cleaned
    match = _PATTERN_RE.fullmatch(cleaned) if cleaned.isascii() else None
    port = _port(match["scheme"], match["port"]) if match else False
    if match is None or port is False:
        raise ValueError(
            f"{text!r} is not an origin: write scheme://host[:port] (e.g. 'https://example.com'), "
            "'scheme://*.host' for a host and its subdomains, or '*' for any origin"
        )
    return OriginPattern(match["scheme"], match["host"], port, subdomains=bool(match["wildcard"]))  # type: ignore[arg-type]


def split_host(host: str) -> tuple[str, int | None]:
    """Split a ``Host`` value (``name``, ``name:port``, ``[v6]:port``) into host and port.

    The port is None when absent or not a number; ``host`` is lowercased.
    """
    host = host.lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        name += "]"
        digits = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, digits = host.rpartition(":") if ":" in host else (host, "", "")
    port = int(digits) if digits.isdigit() and len(digits) <= 5 else None
    return name, port
