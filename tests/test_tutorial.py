"""The tutorial works as written: its project is built from the page's own code blocks.

docs/tutorial.md names the file of each code block on its first line (``# chat/views.py``,
``{# chat/templates/chat/room.html #}``; the settings block is appended to the
settings ``startproject`` wrote). This test runs ``startproject`` and ``startapp`` as
the tutorial says, writes the blocks, and runs ``manage.py check`` and the tutorial's
own tests (``manage.py test chat``: a view's publish() captured, and a live websocket
receiving what a POST to the view published, through a real Redis).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(180)

TUTORIAL = ROOT / "docs" / "tutorial.md"
BLOCK = re.compile(r"^```\w+\n(?:#|\{#) ([\w/.]+)(?:, at the end)?(?: #\})?\n(.*?)^```", re.S | re.M)


def tutorial_files() -> dict[str, str]:
    return {name: body for name, body in BLOCK.findall(TUTORIAL.read_text())}


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def test_the_page_names_the_files_of_its_project():
    assert sorted(tutorial_files()) == [
        "chat/templates/chat/room.html",
        "chat/templates/registration/login.html",
        "chat/tests.py",
        "chat/views.py",
        "mysite/settings.py",
        "mysite/urls.py",
    ]


def test_the_tutorial_project_passes_its_checks_and_its_tests(redis_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "EXAMPLE_"))}
    env["DJANGO_WS_REDIS_URL"] = redis_server.url
    site = tmp_path / "mysite"
    run([sys.executable, "-m", "django", "startproject", "mysite"], tmp_path, env)
    run([sys.executable, "manage.py", "startapp", "chat"], site, env)
    for name, body in tutorial_files().items():
        path = site / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "mysite/settings.py":
            path.write_text(path.read_text() + "\n" + body)
        else:
            path.write_text(body)

    check = run([sys.executable, "manage.py", "check"], site, env)
    assert "System check identified no issues" in check.stdout
    result = run([sys.executable, "manage.py", "test", "chat", "-v", "2"], site, env)
    assert "Ran 2 tests" in result.stderr
    assert "\nOK\n" in result.stderr
