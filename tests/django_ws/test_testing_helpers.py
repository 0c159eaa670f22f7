"""The testing helpers offered to users: used the way a project would use them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import django_ws
from django_ws.testing import capture_publishes
from tests.conftest import EXAMPLE

pytest_plugins = ["django_ws.testing_pytest"]


def test_capture_publishes_records_without_redis(project, ws_settings):
    ws_settings(REDIS_URL="redis://127.0.0.1:1/0")  # nothing listens there
    with capture_publishes() as sent:
        result = django_ws.publish("news", {"a": 1}, users=["alice"], groups=["red"])
    assert [(c.facility, c.users, c.groups, c.message) for c in sent] == [("news", ["alice"], ["red"], {"a": 1})]
    assert [p.offset for p in result] == [1, 2]
    with capture_publishes(), pytest.raises(ValueError):
        django_ws.publish("news", "no audience")


def test_ws_publishes_fixture(project, ws_publishes):
    django_ws.publish("news", "x", broadcast=True)
    assert ws_publishes[0].broadcast and ws_publishes[0].message == "x"


def test_ws_live_server_fixture(project, ws_live_server):
    alice = project.users["alice"]
    ws = ws_live_server.connect("helpers", "subscribe-user", user=alice)
    django_ws.publish("helpers", "to alice", users=[alice])
    assert ws.receive_message() == "to alice"


@pytest.mark.timeout(120)
def test_the_example_projects_own_tests_pass(project):
    result = subprocess.run(
        [sys.executable, "manage.py", "test", "chat", "-v", "2"],
        cwd=EXAMPLE,
        env={**os.environ, **project.env},
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Ran 5 tests" in result.stderr
