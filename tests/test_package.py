"""The package as a user gets it: sdist and wheel, installed in fresh virtualenvs.

``python -m build`` makes both; ``twine check`` passes them. The wheel is installed in
new virtualenvs with no checkout beside them (the example project and the ini are
copied into an empty directory, the package comes from site-packages only), and:

* with the ``[django]`` extra and gevent, under uWSGI: the example stack of
  ``uwsgi.ini.example`` does a websocket handshake and delivers a message published
  by ``django_ws.publish()`` from that virtualenv;
* with the ``[django]`` extra alone (no gevent, no uWSGI): ``manage.py runserver``
  serves websockets, and the example's tests, written with ``django_ws.testing``, pass.

The uWSGI binary is the one scripts/bootstrap.sh built and checked (SSL and PCRE),
copied into the new virtualenv's bin: compiling it again would take a minute or two,
and its embedded Python takes the virtualenv of the directory it runs from.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import uwsgi_ws
from tests.conftest import ROOT, UWSGI, WS, start_stack, stop

pytestmark = pytest.mark.timeout(300)

STATIC_FILES = ("django_ws.mjs", "django_ws.js", "django_ws.min.js", "django_ws.d.ts")


def run(command: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 240) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """Build the sdist, then the wheel from it (what ``python -m build`` does)."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, f"python -m build:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    (out / "build.log").write_text(result.stdout + result.stderr)
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist, "log": out / "build.log"}


def fresh_venv(path: Path, wheel: Path, *requirements: str) -> Path:
    """Create a virtualenv at ``path`` with ``wheel`` (and ``requirements``) installed; return its bin."""
    run([sys.executable, "-m", "venv", str(path)])
    bin_dir = path / "bin"
    run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
        timeout=280,
    )
    return bin_dir


def copy_site(tmp: Path) -> Path:
    """The example project and the ini, alone in an empty directory."""
    site = tmp / "site"
    shutil.copytree(ROOT / "example", site / "example", ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    shutil.copy(ROOT / "uwsgi.ini.example", site / "uwsgi.ini.example")
    return site


def imported_from(bin_dir: Path, cwd: Path) -> str:
    return run([str(bin_dir / "python"), "-c", "import uwsgi_ws, django_ws; print(uwsgi_ws.__file__)"], cwd=cwd).strip()


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        [name] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(name))


# --------------------------------------------------------------------------- the files


def test_twine_check_passes(dist):
    out = run([sys.executable, "-m", "twine", "check", "--strict", str(dist["wheel"]), str(dist["sdist"])])
    assert out.count("PASSED") == 2


def test_the_wheel_holds_the_static_client_and_the_type_markers(dist):
    with zipfile.ZipFile(dist["wheel"]) as z:
        names = set(z.namelist())
        for name in STATIC_FILES:
            member = f"django_ws/static/django_ws/{name}"
            assert member in names
            assert z.read(member) == (ROOT / member).read_bytes()
    assert {"uwsgi_ws/py.typed", "django_ws/py.typed"} <= names
    assert not [n for n in names if n.startswith(("tests/", "example/", "client/", "docs/"))]


def test_the_build_warns_of_no_package_left_out(dist):
    """setuptools warned that django_ws/static/django_ws was not in the packages."""
    log = dist["log"].read_text()
    assert "Successfully built" in log
    assert "is absent from the `packages` configuration" not in log


def test_one_version_everywhere(dist):
    version = uwsgi_ws.__version__
    assert metadata(dist["wheel"])["Version"] == version
    assert dist["sdist"].name == f"django_uwsgi_ws-{version}.tar.gz"
    assert json.loads((ROOT / "client" / "package.json").read_text())["version"] == version
    assert f"## {version}" in (ROOT / "CHANGELOG.md").read_text()


def test_the_classifiers_list_what_the_tests_run_on(dist):
    import django

    classifiers = metadata(dist["wheel"]).get_all("Classifier")
    assert f"Programming Language :: Python :: {sys.version_info[0]}.{sys.version_info[1]}" in classifiers
    assert f"Framework :: Django :: {django.VERSION[0]}.{django.VERSION[1]}" in classifiers
    # Every version listed is one the suite runs on (this machine's CI runs one of each).
    listed = [
        c for c in classifiers if c.startswith(("Programming Language :: Python :: 3.", "Framework :: Django ::"))
    ]
    assert len(listed) == 2, listed


# --------------------------------------------------------------------------- installed


def test_the_wheel_alone_runs_the_example_stack(dist, project, facility, tmp_path):
    """uWSGI offload stack from the wheel: handshake, then one message from publish()."""
    bin_dir = fresh_venv(tmp_path / "venv", dist["wheel"], f"{dist['wheel']}[django]", "gevent>=23", "hiredis>=2")
    shutil.copy2(UWSGI, bin_dir / "uwsgi")
    site = copy_site(tmp_path)
    assert imported_from(bin_dir, site).startswith(str(tmp_path / "venv"))
    env = {"EXAMPLE_FACILITIES": facility, "PYTHONPATH": ""}
    stack = start_stack("offload", project, tmp_path, root=site, bin_dir=bin_dir, **env)
    try:
        ws = WS(stack.url(f"/ws/{facility}?subscribe-broadcast"))
        try:
            assert [f["channel"] for f in ws.ready() if f["type"] == "subscribed"] == ["broadcast"]
            publish = f"import django_ws; django_ws.publish({facility!r}, 'from the wheel', broadcast=True)"
            run(
                [str(bin_dir / "python"), "manage.py", "shell", "-c", publish],
                cwd=site / "example",
                env={**os.environ, **project.env, **env},
            )
            frame = ws.next()
            assert (frame["type"], frame["channel"], frame["data"]) == ("message", "broadcast", "from the wheel")
        finally:
            ws.close()
        log = stack.log.read_text()
        assert str(ROOT / "uwsgi_ws") not in log
    finally:
        for proc in stack.procs:
            stop(proc)


@pytest.fixture(scope="module")
def django_only(dist, tmp_path_factory) -> Path:
    """A virtualenv with the ``[django]`` extra alone: no gevent, no uWSGI."""
    bin_dir = fresh_venv(tmp_path_factory.mktemp("django-only") / "venv", dist["wheel"], f"{dist['wheel']}[django]")
    assert not (bin_dir / "uwsgi").exists()
    missing = subprocess.run([str(bin_dir / "python"), "-c", "import gevent"], capture_output=True, text=True)
    assert missing.returncode == 1 and "No module named 'gevent'" in missing.stderr
    return bin_dir


def test_without_gevent_runserver_serves_websockets(django_only, project, facility, tmp_path):
    site = copy_site(tmp_path)
    assert imported_from(django_only, site).startswith(str(django_only.parent))
    env = {"EXAMPLE_FACILITIES": facility, "PYTHONPATH": ""}
    stack = start_stack("runserver", project, tmp_path, root=site, bin_dir=django_only, **env)
    try:
        alice = project.cookie("alice")
        ws = WS(stack.url(f"/ws/{facility}?subscribe-user"), session=alice)
        try:
            assert [f["channel"] for f in ws.ready() if f["type"] == "subscribed"] == ["user"]
            publish = (
                "import django_ws; from django.contrib.auth.models import User; "
                f"django_ws.publish({facility!r}, 'no gevent', users=[User.objects.get(username='alice')])"
            )
            run(
                [str(django_only / "python"), "manage.py", "shell", "-c", publish],
                cwd=site / "example",
                env={**os.environ, **project.env, **env},
            )
            frame = ws.next()
            assert (frame["type"], frame["channel"], frame["data"]) == ("message", "user", "no gevent")
        finally:
            ws.close()
    finally:
        for proc in stack.procs:
            stop(proc)


def test_without_gevent_the_testing_helpers_work(django_only, project, tmp_path):
    """The example's tests use capture_publishes and WebSocketLiveServerTestCase."""
    site = copy_site(tmp_path)
    result = subprocess.run(
        [str(django_only / "python"), "manage.py", "test", "chat", "-v", "2"],
        cwd=site / "example",
        env={**os.environ, **project.env, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Ran 5 tests" in result.stderr
    assert "\nOK\n" in result.stderr
    # The live server stops its Hub at the end: no traceback from the reader thread.
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
