"""Origins as browsers send them, and the patterns of the settings (pure logic)."""

from __future__ import annotations

import pytest

from django_ws.origins import Origin, OriginPattern, parse_origin, parse_origin_pattern, split_host


@pytest.mark.parametrize(
    "header,expected",
    [
        ("http://127.0.0.1:8000", Origin("http", "127.0.0.1", 8000)),
        ("https://example.com", Origin("https", "example.com", 443)),
        ("https://example.com:443", Origin("https", "example.com", 443)),
        ("http://example.com", Origin("http", "example.com", 80)),
        ("HTTPS://Example.COM", Origin("https", "example.com", 443)),
        ("http://[::1]:8000", Origin("http", "[::1]", 8000)),
        ("chrome-extension://abcdef", Origin("chrome-extension", "abcdef", None)),
        ("http://xn--caf-dma.example", Origin("http", "xn--caf-dma.example", 80)),
    ],
)
def test_origins_browsers_send(header, expected):
    assert parse_origin(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        "null",
        "",
        " ",
        "http://127.0.0.1:8000/",
        "http://127.0.0.1:8000/path",
        "http://127.0.0.1:8000?q",
        "http://127.0.0.1:8000#f",
        "http://user@127.0.0.1:8000",
        "http://127.0.0.1:8000 ",
        " http://127.0.0.1:8000",
        "http://127.0.0.1:0",
        "http://127.0.0.1:65536",
        "http://127.0.0.1:08000",
        "http://127.0.0.1:",
        "127.0.0.1:8000",
        "//127.0.0.1:8000",
        "http:127.0.0.1",
        "http://",
        "http://café.example",
        "http://exa mple.com",
        "http://-example.com.",
        "http://example.com.",
        "http://a\r\nb",
        "1http://example.com",
    ],
)
def test_anything_else_is_not_an_origin(header):
    assert parse_origin(header) is None


def test_an_origin_prints_as_browsers_write_it():
    assert str(Origin("https", "example.com", 443)) == "https://example.com"
    assert str(Origin("http", "example.com", 8080)) == "http://example.com:8080"


@pytest.mark.parametrize(
    "pattern,origin,allowed",
    [
        ("https://*.example.com", "https://example.com", True),
        ("https://*.example.com", "https://a.example.com", True),
        ("https://*.example.com", "https://a.b.example.com", True),
        ("https://*.example.com", "http://a.example.com", False),
        ("https://*.example.com", "https://a.example.com:8443", False),
        ("https://*.example.com", "https://badexample.com", False),
        ("https://*.example.com", "https://example.com.evil.test", False),
        ("https://*.example.com:8443", "https://a.example.com:8443", True),
        ("https://example.com", "https://a.example.com", False),
        ("https://example.com/", "https://example.com", True),
        ("HTTPS://Example.com", "https://example.com", True),
        ("https://example.com:443", "https://example.com", True),
        ("*", "http://anything.test:1234", True),
    ],
)
def test_patterns(pattern, origin, allowed):
    parsed = parse_origin(origin)
    assert parsed is not None
    assert parse_origin_pattern(pattern).matches(parsed) is allowed


@pytest.mark.parametrize("pattern", ["example.com", "https://", "https://*", "https://a.*.com", "https://x/y", 3, ""])
def test_bad_patterns_say_what_is_expected(pattern):
    with pytest.raises(ValueError, match="scheme://host"):
        parse_origin_pattern(pattern)  # type: ignore[arg-type]


def test_any_pattern():
    assert parse_origin_pattern("*") == OriginPattern(any=True)


@pytest.mark.parametrize(
    "host,expected",
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("Example.com", ("example.com", None)),
        ("[::1]:8000", ("[::1]", 8000)),
        ("[::1]", ("[::1]", None)),
        ("example.com:", ("example.com", None)),
    ],
)
def test_split_host(host, expected):
    assert split_host(host) == expected
