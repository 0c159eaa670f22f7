"""Settings of origins, facilities, history bytes and the rate limit: read and validated."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from django_ws.conf import get_settings
from django_ws.origins import parse_origin
from uwsgi_ws.protocol import Limits, Ticket, sign_ticket, verify_ticket


@pytest.mark.parametrize(
    "override,fragment",
    [
        ({"ALLOWED_ORIGINS": ["example.com"]}, "ALLOWED_ORIGINS"),
        ({"ALLOWED_ORIGINS": ["https://example.com/path"]}, "ALLOWED_ORIGINS"),
        ({"ALLOWED_ORIGINS": [3]}, "ALLOWED_ORIGINS"),
        ({"FACILITIES": "chat"}, "FACILITIES"),
        ({"FACILITIES": ["chat", "a..b"]}, "FACILITIES"),
        ({"FACILITIES": ["chat", ""]}, "FACILITIES"),
        ({"FACILITIES": [None]}, "FACILITIES"),
        ({"HISTORY_MAX_BYTES": 0}, "HISTORY_MAX_BYTES"),
        ({"HISTORY_MAX_BYTES": "1M"}, "HISTORY_MAX_BYTES"),
        ({"RATE_LIMIT": (10, 0)}, "RATE_LIMIT"),
        ({"RATE_LIMIT": (10, 0.5)}, "RATE_LIMIT"),
    ],
)
def test_bad_values_name_the_setting(project, override, fragment):
    with override_settings(DJANGO_WS=override):
        with pytest.raises(ImproperlyConfigured, match=fragment):
            get_settings()


@pytest.mark.parametrize("trusted", [["*"], ["example.com"], "https://example.com"])
def test_bad_csrf_trusted_origins_are_named(project, trusted):
    with override_settings(CSRF_TRUSTED_ORIGINS=trusted):
        with pytest.raises(ImproperlyConfigured, match="CSRF_TRUSTED_ORIGINS"):
            get_settings()


def test_allowed_origins_come_from_both_settings(project):
    with override_settings(
        DJANGO_WS={"ALLOWED_ORIGINS": ["https://app.example.org/"]},
        CSRF_TRUSTED_ORIGINS=["https://*.example.com"],
    ):
        conf = get_settings()
        for origin, allowed in [
            ("https://app.example.org", True),
            ("https://a.example.com", True),
            ("http://app.example.org", False),
            ("https://example.org", False),
        ]:
            parsed = parse_origin(origin)
            assert parsed is not None and conf.origin_allowed(parsed) is allowed, origin


def test_changing_csrf_trusted_origins_is_seen(project):
    parsed = parse_origin("https://partner.test")
    assert parsed is not None and not get_settings().origin_allowed(parsed)
    with override_settings(CSRF_TRUSTED_ORIGINS=["https://partner.test"]):
        assert get_settings().origin_allowed(parsed)


def test_facilities_take_names_and_glob_patterns(project):
    with override_settings(DJANGO_WS={"FACILITIES": ["chat", "room-*", "team-?", "log[0-9]"]}):
        facilities = get_settings().facilities
    assert facilities is not None
    for name, allowed in [
        ("chat", True),
        ("chats", False),
        ("room-1", True),
        ("room-", True),
        ("Room-1", False),  # case-sensitive, as facility names are
        ("xroom-1", False),
        ("team-a", True),
        ("team-ab", False),
        ("log7", True),
        ("logx", False),
    ]:
        assert (name in facilities) is allowed, name


def test_history_max_bytes_travels_in_the_ticket(project):
    with override_settings(DJANGO_WS={"HISTORY_MAX_BYTES": 4096}):
        limits = get_settings().limits()
    assert limits.history_max_bytes == 4096
    with override_settings(DJANGO_WS={"HISTORY_MAX_BYTES": None}):
        assert get_settings().limits().history_max_bytes == 0  # no byte cap
    assert get_settings().limits().history_max_bytes == 1 << 20  # the default
    secret = b"s" * 32
    ticket = verify_ticket(sign_ticket(Ticket(subscribe={}, limits=limits, expires=2e9), secret), secret)
    assert ticket.limits.history_max_bytes == 4096


def test_a_ticket_without_the_byte_cap_still_parses():
    """Tickets signed before the field existed (eight limits) mean "no byte cap"."""
    data = Ticket(subscribe={}, expires=2e9).to_dict()
    data["m"] = data["m"][:8]
    assert Ticket.from_dict(data).limits == Limits(history_max_bytes=0)
