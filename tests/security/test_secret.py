"""Attack: sign tickets with a secret anyone can know.

The ticket secret is what every right rests on: whoever knows it signs tickets for
any channel. uwsgi.ini.example used to give both instances the literal text of its
own ``@(exec://...)`` line as the secret (uWSGI expands ``%(...)`` after ``@(...)``),
a string public in the repository. Now there is no default anywhere: the ini exports
no secret, a missing, short or placeholder secret stops both sides at start-up, and
without offloading (tickets never leave the process) Django makes a random one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from tests.conftest import EXAMPLE, WS, private_dir, wait_for
from tests.security.ini_runs import INI, environ_of, readme_env, start

pytestmark = pytest.mark.timeout(120)

GOOD = secrets.token_hex(32)
# What the old ini handed both instances when DJANGO_WS_SECRET was not set.
OLD_DEFAULT = '@(exec://python3 -c "import secrets; print(secrets.token_hex(32))")'
BAD = {
    "missing": None,
    "short": "s" * 31,
    "placeholder": OLD_DEFAULT,
}


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        b"",
        "x" * 31,
        "é" * 15 + "x",  # 31 bytes in UTF-8, although 16 characters
        OLD_DEFAULT,
        "$(DJANGO_WS_SECRET)" + "x" * 40,
        "%(x_secret)" + "x" * 40,
        "${DJANGO_WS_SECRET}" + "x" * 40,
        "@(/etc/django-ws/secret)" + "x" * 40,
    ],
)
def test_the_rule_refuses_missing_short_and_placeholder_secrets(value):
    from uwsgi_ws.config import check_secret
    from uwsgi_ws.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="DJANGO_WS_SECRET") as raised:
        check_secret(value)
    if value:
        text = value if isinstance(value, str) else value.decode()
        assert text not in str(raised.value)  # a secret never appears in a message


@pytest.mark.parametrize("value", [secrets.token_hex(16), secrets.token_hex(32), "é" * 16, b"\x00" * 32])
def test_the_rule_accepts_32_bytes_or_more(value):
    from uwsgi_ws.config import check_secret

    assert check_secret(value) == (value.encode() if isinstance(value, str) else value)


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_websocket_instance_configuration_applies_the_rule(case):
    from uwsgi_ws.config import Config
    from uwsgi_ws.exceptions import ConfigurationError

    environ = {} if BAD[case] is None else {"DJANGO_WS_SECRET": BAD[case]}
    with pytest.raises(ConfigurationError, match="DJANGO_WS_SECRET"):
        Config.from_env(environ)
    assert Config.from_env({"DJANGO_WS_SECRET": GOOD}).secret == GOOD.encode()


# --------------------------------------------------------------------------- Django


def _django_secret(monkeypatch, case: str) -> None:
    monkeypatch.delenv("DJANGO_WS_SECRET", raising=False)
    monkeypatch.delenv("DJANGO_WS_OFFLOAD_TO", raising=False)
    if BAD[case] is not None:
        monkeypatch.setenv("DJANGO_WS_SECRET", BAD[case])


@pytest.mark.parametrize("case", sorted(BAD))
def test_offloading_without_a_good_secret_the_middleware_refuses_to_load(project, monkeypatch, case, tmp_path):
    from django_ws.middleware import WebSocketMiddleware

    _django_secret(monkeypatch, case)
    run = private_dir(tmp_path)
    with override_settings(DJANGO_WS={"OFFLOAD_TO": f"{run}/ws.sock"}):
        with pytest.raises(ImproperlyConfigured, match="DJANGO_WS_SECRET"):
            WebSocketMiddleware(lambda request: None)


@pytest.mark.parametrize("case", sorted(BAD))
def test_offloading_without_a_good_secret_is_a_system_check_error(project, monkeypatch, case, tmp_path):
    from django_ws.checks import check_settings

    _django_secret(monkeypatch, case)
    run = private_dir(tmp_path)
    with override_settings(DJANGO_WS={"OFFLOAD_TO": f"{run}/ws.sock"}):
        errors = check_settings()
    assert [e.id for e in errors] == ["django_ws.E003"] and "DJANGO_WS_SECRET" in errors[0].msg


@pytest.mark.parametrize("case", ["short", "placeholder"])
def test_without_offloading_a_configured_secret_must_pass_the_rule_too(project, monkeypatch, case):
    from django_ws.checks import check_settings
    from django_ws.middleware import WebSocketMiddleware

    _django_secret(monkeypatch, case)
    with override_settings(DJANGO_WS={}):
        with pytest.raises(ImproperlyConfigured, match="DJANGO_WS_SECRET"):
            WebSocketMiddleware(lambda request: None)
        assert [e.id for e in check_settings()] == ["django_ws.E003"]
    with override_settings(DJANGO_WS={"TICKET_SECRET": BAD[case]}):
        with pytest.raises(ImproperlyConfigured, match="TICKET_SECRET"):
            WebSocketMiddleware(lambda request: None)


def test_without_offloading_and_without_a_secret_each_process_makes_a_random_one(project, monkeypatch):
    from django.conf import settings

    from django_ws.checks import check_settings
    from django_ws.conf import get_settings
    from django_ws.middleware import WebSocketMiddleware

    _django_secret(monkeypatch, "missing")
    with override_settings(DJANGO_WS={}):
        WebSocketMiddleware(lambda request: None)  # loads
        assert check_settings() == []
        secret = get_settings().ticket_secret
        # not the old derivation from the (public, in the example) SECRET_KEY
        derived = hashlib.sha256(b"django_ws.ticket:" + settings.SECRET_KEY.encode()).hexdigest().encode()
        assert secret != derived and len(secret) >= 32
    with override_settings(DJANGO_WS={}, SECRET_KEY="another key entirely"):
        assert get_settings().ticket_secret == secret  # the same for the life of the process

    # Another process (same settings, same SECRET_KEY) makes another secret.
    show = (
        "import django; django.setup(); from django_ws.conf import get_settings; "
        "print(get_settings().ticket_secret.decode())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_WS_SECRET", "DJANGO_WS_OFFLOAD_TO")}
    others = {
        subprocess.run(
            [sys.executable, "-c", show], cwd=EXAMPLE, env=env, capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(others) == 2 and secret.decode() not in others


# --------------------------------------------------------------------------- the ini, for real


def test_the_ini_gives_the_websocket_instance_exactly_the_secret_given(redis_server, project, tmp_path):
    env = readme_env(redis_url=redis_server.url, secret=GOOD, EXAMPLE_DB=project.env["EXAMPLE_DB"])
    env["DJANGO_WS_OFFLOAD_TO"] = str(private_dir(tmp_path) / "ws.sock")
    run = start(INI, env, tmp_path)
    try:
        run.wait_serving()
        run.websocket_listening()
        assert run.websocket_environ()["DJANGO_WS_SECRET"] == GOOD
        ws = WS(f"ws://127.0.0.1:{run.port}/ws/chat?subscribe-broadcast")
        ws.ready()  # Django signed, the websocket instance verified: the same secret
        ws.close()
    finally:
        run.stop()
    assert run.processes() == []


def test_single_instance_gets_exactly_the_secret_given(redis_server, project, tmp_path):
    env = readme_env(redis_url=redis_server.url, secret=GOOD, EXAMPLE_DB=project.env["EXAMPLE_DB"])
    run = start(INI, env, tmp_path, section="single")
    try:
        run.wait_serving()
        assert {environ_of(pid).get("DJANGO_WS_SECRET") for pid in run.processes()} == {GOOD}
    finally:
        run.stop()


@pytest.mark.parametrize(
    "section,case",
    # (a single instance without any secret starts, with a random one: see the next test)
    [("", "missing"), ("", "short"), ("", "placeholder"), ("single", "short"), ("single", "placeholder")],
    ids=["offload-missing", "offload-short", "offload-placeholder", "single-short", "single-placeholder"],
)
def test_without_a_good_secret_the_whole_command_exits(redis_server, project, tmp_path, case, section):
    env = readme_env(redis_url=redis_server.url, secret=BAD[case], EXAMPLE_DB=project.env["EXAMPLE_DB"])
    if not section:
        env["DJANGO_WS_OFFLOAD_TO"] = str(private_dir(tmp_path) / "ws.sock")
    run = start(INI, env, tmp_path, section=section)
    try:
        status = run.wait_exit(timeout=60)
        assert status != 0, run.text()[-2000:]
        assert [line for line in run.refusals() if "DJANGO_WS_SECRET" in line], run.text()[-2000:]
        assert run.processes() == []
    finally:
        run.stop()


def test_single_instance_without_a_secret_starts_with_a_random_one(redis_server, project, tmp_path):
    env = readme_env(redis_url=redis_server.url, secret=None, EXAMPLE_DB=project.env["EXAMPLE_DB"])
    run = start(INI, env, tmp_path, section="single")
    try:
        run.wait_serving()
        ws = WS(f"ws://127.0.0.1:{run.port}/ws/chat?subscribe-broadcast")
        ws.ready()  # tickets signed and verified in the process, with its own secret
        ws.close()
    finally:
        run.stop()


@pytest.mark.parametrize("section", ["", "websocket", "single"], ids=["front", "websocket", "single"])
def test_the_ini_exports_no_secret_of_its_own(redis_server, project, tmp_path, section):
    """/proc shows what a process was started with, so a section's own ``env =``
    lines are read from uWSGI's dump of its effective configuration instead."""
    env = readme_env(redis_url=redis_server.url, secret=None, EXAMPLE_DB=project.env["EXAMPLE_DB"])
    env["DJANGO_WS_OFFLOAD_TO"] = str(private_dir(tmp_path) / "ws.sock")
    env["UWSGI_SHOW_CONFIG"] = "1"  # uWSGI reads it as --show-config
    run = start(INI, env, tmp_path, section=section)
    try:
        wait_for(lambda: ";end of configuration" in run.text(), timeout=60, what="the configuration dump")
        dump = run.text().split(";uWSGI instance configuration", 1)[1].split(";end of configuration", 1)[0]
        assert "env = DJANGO_WS_OFFLOAD_TO=" in dump  # the control: exports are in the dump
        assert [line for line in dump.splitlines() if line.startswith("env = DJANGO_WS_SECRET")] == []
    finally:
        run.stop()


@pytest.mark.parametrize("case", ["missing", "short", "placeholder"])
def test_the_websocket_instance_alone_refuses_with_one_line(tmp_path, case, redis_server):
    env = readme_env(redis_url=redis_server.url, secret=BAD[case])
    env["DJANGO_WS_OFFLOAD_TO"] = str(private_dir(tmp_path) / "ws.sock")
    run = start(INI, env, tmp_path, section="websocket")
    try:
        status = run.wait_exit(timeout=30)
        assert status != 0
        [line] = run.refusals()
        assert line.startswith("websocket instance not started: DJANGO_WS_SECRET ")
        assert "Traceback" not in run.text()
        assert run.processes() == []
    finally:
        run.stop()


def test_a_websocket_instance_refused_at_start_is_not_respawned_forever(redis_server, project, tmp_path):
    """Django has a secret of its own (TICKET_SECRET in its settings), the websocket
    instance none: the front must stop rather than start it again and again while
    serving pages that never get a websocket."""
    settings_dir = tmp_path / "settings"
    settings_dir.mkdir()
    (settings_dir / "secret_in_settings.py").write_text(
        f'from chat.settings import *  # noqa\nDJANGO_WS = {{**DJANGO_WS, "TICKET_SECRET": "{GOOD}"}}\n'
    )
    env = readme_env(
        redis_url=redis_server.url,
        secret=None,
        EXAMPLE_DB=project.env["EXAMPLE_DB"],
        DJANGO_SETTINGS_MODULE="secret_in_settings",
        PYTHONPATH=str(settings_dir),
        DJANGO_WS_OFFLOAD_TO=str(private_dir(tmp_path) / "ws.sock"),
    )
    run = start(INI, env, tmp_path)
    try:
        run.wait_exit(timeout=60)
        assert [line for line in run.refusals() if "DJANGO_WS_SECRET" in line]
        assert run.text().count("websocket instance not started") == 1  # started once, not again
        assert run.processes() == []
    finally:
        run.stop()
