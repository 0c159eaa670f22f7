"""Django side rules: settings validation, system checks, middleware decisions."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import RequestFactory, override_settings

from django_ws.checks import check_settings
from django_ws.conf import get_settings
from django_ws.middleware import WebSocketMiddleware
from uwsgi_ws.exceptions import BadRequest, Refused
from uwsgi_ws.protocol import verify_ticket

HANDSHAKE = {
    "HTTP_UPGRADE": "websocket",
    "HTTP_CONNECTION": "Upgrade",
    "HTTP_SEC_WEBSOCKET_VERSION": "13",
    "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
}


@pytest.fixture
def rf(project):
    return RequestFactory()


@pytest.mark.parametrize(
    "override,fragment",
    [
        ({"HISTORY_SIZE": -1}, "HISTORY_SIZE"),
        ({"HISTORY_TTL": 0}, "HISTORY_TTL"),
        ({"PREFIX": "a:b"}, "PREFIX"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"ALLOWED_ORIGINS": "https://a.example"}, "ALLOWED_ORIGINS"),
        ({"CLIENT_PUBLISH": ("everyone",)}, "CLIENT_PUBLISH"),
        ({"RATE_LIMIT": 10}, "RATE_LIMIT"),
        ({"AUTHORIZE": "no.such.hook"}, "AUTHORIZE"),
        ({"PUBLISH_COMMAND": "XPUBLISH"}, "PUBLISH_COMMAND"),
        ({"PRESENCE_TTL": 0}, "PRESENCE_TTL"),
        ({"PRESENCE_INFO": "no.such.hook"}, "PRESENCE_INFO"),
        ({"PRESENCE_INFO": 3}, "PRESENCE_INFO"),
        ({"PRESENCE_EVENTS": "chat"}, "PRESENCE_EVENTS"),
        ({"PRESENCE_EVENTS": ["a..b"]}, "PRESENCE_EVENTS"),
        ({"PRESENCE_STREAM_SIZE": -1}, "PRESENCE_STREAM_SIZE"),
        ({"HISTROY_SIZE": 3}, "unknown DJANGO_WS setting"),
    ],
)
def test_bad_settings_name_the_setting(project, override, fragment):
    with override_settings(DJANGO_WS=override):
        with pytest.raises(ImproperlyConfigured, match=fragment):
            get_settings()
        [error] = check_settings()
        assert error.id == "django_ws.E001" and fragment in error.msg


def test_websocket_url_must_be_a_prefix(project):
    with override_settings(WEBSOCKET_URL="ws"):
        with pytest.raises(ImproperlyConfigured, match="WEBSOCKET_URL"):
            get_settings()


def test_middleware_order_is_checked(project):
    from django.conf import settings

    wrong = [m for m in settings.MIDDLEWARE if "WebSocket" in m] + [
        m for m in settings.MIDDLEWARE if "WebSocket" not in m
    ]
    with override_settings(MIDDLEWARE=wrong):
        assert {e.id for e in check_settings()} == {"django_ws.E002"}


def test_offload_without_a_shared_secret_is_an_error(project, monkeypatch):
    monkeypatch.delenv("DJANGO_WS_SECRET")
    with override_settings(DJANGO_WS={"OFFLOAD_TO": "127.0.0.1:9"}):
        [error] = check_settings()
        assert error.id == "django_ws.E003" and "DJANGO_WS_SECRET" in error.msg


def test_the_example_project_passes_its_checks(project):
    assert check_settings() == []


def _request(rf, path, user=None, **extra):
    from django.contrib.auth.models import AnonymousUser

    request = rf.get(path, **{**HANDSHAKE, **extra})
    request.user = user or AnonymousUser()
    request.session = type("S", (), {"session_key": None})()
    return request


def test_ticket_resolves_groups_fresh_from_the_database(project, rf):
    from django.contrib.auth.models import Group

    alice = project.users["alice"]
    middleware = WebSocketMiddleware(lambda r: None)
    conf = get_settings()
    ticket = middleware.authorize(_request(rf, "/ws/f?subscribe-group", alice), "f", conf)
    assert set(ticket.subscribe) == {"group:red"}
    extra = Group.objects.create(name="late joiners")
    alice.groups.add(extra)
    try:
        ticket = middleware.authorize(_request(rf, "/ws/f?subscribe-group", alice), "f", conf)
        assert set(ticket.subscribe) == {"group:red", "group:late joiners"}
    finally:
        alice.groups.remove(extra)
        extra.delete()
    ticket = middleware.authorize(_request(rf, "/ws/f?subscribe-group", alice), "f", conf)
    assert set(ticket.subscribe) == {"group:red"}


def test_without_a_websocket_server_the_answer_is_503(project, rf):
    response = WebSocketMiddleware(lambda r: None)(_request(rf, "/ws/f?subscribe-broadcast"))
    # Outside uWSGI and without an in-process server, nothing can serve the socket.
    assert response.status_code == 503


@pytest.mark.parametrize(
    "path,error",
    [
        ("/ws/f?subscribe-user", Refused),
        ("/ws/f?subscribe-session", Refused),
        ("/ws/f?publish-broadcast", Refused),
        ("/ws/f?bogus", BadRequest),
    ],
)
def test_refusals(project, rf, path, error):
    with pytest.raises(error):
        WebSocketMiddleware(lambda r: None).authorize(_request(rf, path), "f", get_settings())


def test_authorize_hook_is_applied_to_every_channel(project, rf):
    calls = []

    def hook(request, facility, action, audience):
        calls.append((facility, action, audience.label))
        return audience.label != "group:red"

    bob = project.users["bob"]
    with override_settings(DJANGO_WS={"AUTHORIZE": hook, "CLIENT_PUBLISH": ("broadcast",)}):
        ticket = WebSocketMiddleware(lambda r: None).authorize(
            _request(rf, "/ws/f?subscribe-group&subscribe-broadcast&publish-broadcast", bob), "f", get_settings()
        )
        assert set(ticket.subscribe) == {"broadcast", "group:blue team"}
        assert ("f", "publish", "broadcast") in calls
        with pytest.raises(Refused):
            WebSocketMiddleware(lambda r: None).authorize(
                _request(rf, "/ws/f?subscribe-group", project.users["alice"]), "f", get_settings()
            )


def test_ticket_in_environ_for_in_process_servers(project, rf):
    request = _request(rf, "/ws/f?subscribe-broadcast", **{"django_ws.server": "inline"})
    response = WebSocketMiddleware(lambda r: None)(request)
    assert response.status_code == 202
    ticket = verify_ticket(request.META["DJANGO_WS_TICKET"], get_settings().ticket_secret)
    assert set(ticket.subscribe) == {"broadcast"}


def test_other_paths_pass_through(project, rf):
    sentinel = object()
    assert WebSocketMiddleware(lambda r: sentinel)(rf.get("/elsewhere")) is sentinel


def test_single_instance_takes_secret_from_settings_and_tuning_from_the_environment(project, monkeypatch):
    from django_ws.wsgi import WebSocketWSGIHandler

    monkeypatch.setenv("DJANGO_WS_POOL_SIZE", "3")
    monkeypatch.setenv("DJANGO_WS_CLOCK_SKEW", "1.5")
    monkeypatch.setenv("DJANGO_WS_SECRET", "not the one Django uses, though long enough")
    monkeypatch.setenv("DJANGO_WS_PUBLISH_COMMAND", "PUBLISH")
    own = "django's own, as long as it must be"
    with override_settings(DJANGO_WS={"PUBLISH_COMMAND": "SPUBLISH", "TICKET_SECRET": own}):
        conf = get_settings()
        config = WebSocketWSGIHandler(lambda environ, start_response: []).websocket_app().config
    assert (config.pool_size, config.clock_skew) == (3, 1.5)
    assert (config.secret, config.redis_url, config.publish_command) == (own.encode(), conf.redis_url, "SPUBLISH")


def test_thread_slots_number_the_threads_of_a_process():
    import threading

    from django_ws.middleware import thread_slot

    mine = thread_slot()
    assert thread_slot() == mine  # stable per thread
    seen: list[str] = []
    threads = [threading.Thread(target=lambda: seen.append(thread_slot())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen + [mine])) == 5 and all(s.isdigit() and int(s) >= 1 for s in seen)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("127.0.0.1:8001", ("127.0.0.1:8001",)),
        ("/run/a.sock, 10.0.0.2:8001", ("/run/a.sock", "10.0.0.2:8001")),
        (["/run/a.sock", "/run/b.sock"], ("/run/a.sock", "/run/b.sock")),
    ],
)
def test_offload_to_takes_one_address_or_several(project, value, expected, monkeypatch):
    monkeypatch.setenv("DJANGO_WS_SECRET", "s" * 32)
    with override_settings(DJANGO_WS={"OFFLOAD_TO": value}):
        assert get_settings().offload_to == expected


@pytest.mark.parametrize("value", ["", "a b:1", "nohost", ["/a.sock", 3], "/a.sock,,/b.sock"])
def test_bad_offload_addresses_are_named(project, value):
    with override_settings(DJANGO_WS={"OFFLOAD_TO": value or " "}):
        with pytest.raises(ImproperlyConfigured, match="OFFLOAD_TO"):
            get_settings()


def test_hand_overs_take_turns_over_the_websocket_instances(project, rf, monkeypatch, tmp_path):
    import sys
    import types

    from tests.conftest import private_dir

    added: list[tuple[str, str]] = []
    fake = types.ModuleType("uwsgi")
    fake.add_var = lambda name, value: added.append((name, value))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uwsgi", fake)
    monkeypatch.setenv("DJANGO_WS_SECRET", "s" * 32)
    run = private_dir(tmp_path)  # the middleware refuses sockets in directories others may enter
    sockets = [f"{run}/a.sock", f"{run}/b.sock", f"{run}/c.sock"]
    with override_settings(DJANGO_WS={"OFFLOAD_TO": sockets}):
        middleware = WebSocketMiddleware(lambda request: None)
        for _ in range(6):
            response = middleware(rf.get("/ws/chat?subscribe-broadcast", **HANDSHAKE))
            assert response.status_code == 202
    chosen = [value for name, value in added if name == "DJANGO_WS_OFFLOAD"]
    assert chosen[:3] != chosen[:1] * 3 and sorted(chosen) == sorted(sockets * 2)
    assert chosen[:3] == chosen[3:]  # in turn
