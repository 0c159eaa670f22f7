"""The documentation site (docs/): it builds without a warning, its links resolve, and
its reference keeps up with the code.

* Sphinx builds the HTML with warnings as errors; MyST reports a link to a missing
  page or heading as a warning, and every relative link of the built pages (toctrees,
  autodoc, included files too) is then followed to its file and anchor.
* Every setting the code has (the ``DJANGO_WS`` keys, the environment variables the
  websocket instance and Django read, the variables ``uwsgi.ini.example`` reads) has
  a row in docs/reference/settings.md, with its type, default and effect.
* The API reference documents every public name, and the browser client's sizes in
  the docs are those of the committed builds.
"""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.conftest import ROOT

DOCS = ROOT / "docs"
SETTINGS_PAGE = DOCS / "reference" / "settings.md"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, f"the docs build failed or warned:\n{result.stderr[-8000:]}"
    return out


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"])  # type: ignore[arg-type]
        if tag == "a" and values.get("name"):
            self.ids.add(values["name"])  # type: ignore[arg-type]
        if tag == "a" and values.get("href"):
            self.links.append(values["href"])  # type: ignore[arg-type]
        if tag in ("img", "script") and values.get("src"):
            self.links.append(values["src"])  # type: ignore[arg-type]
        if tag == "link" and values.get("href"):
            self.links.append(values["href"])  # type: ignore[arg-type]


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_the_docs_build_without_warnings(html):
    for page in ("index", "tutorial", "architecture", "benchmark", "changelog", "security-model"):
        assert (html / f"{page}.html").is_file(), page
    for page in ("deploy", "sentinel", "cluster", "several-instances", "migrate", "testing"):
        assert (html / "howto" / f"{page}.html").is_file(), page
    for page in ("settings", "api", "protocol", "close-codes", "client"):
        assert (html / "reference" / f"{page}.html").is_file(), page
    assert "furo" in (html / "index.html").read_text()


def test_every_internal_link_resolves(html):
    pages = {path: parse(path) for path in html.rglob("*.html")}
    broken = []
    checked = 0
    for path, page in pages.items():
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "javascript:")):
                continue
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            checked += 1
            if not target.exists():
                broken.append(f"{path.relative_to(html)}: {link} (no such file)")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{path.relative_to(html)}: {link} (no such anchor)")
    assert checked > 500
    assert broken == []


# --------------------------------------------------------------------------- settings


def documented_settings() -> dict[str, list[str]]:
    """Each name in the first cell of a table row of the settings page -> the row's other cells."""
    rows: dict[str, list[str]] = {}
    for line in SETTINGS_PAGE.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]):
            rows[name] = cells[1:]
    return rows


class _Recording(dict):
    """An environment that remembers every variable asked for."""

    def __init__(self) -> None:
        super().__init__(DJANGO_WS_SECRET="s" * 64)
        self.asked: set[str] = set()

    def get(self, key, default=None):  # type: ignore[no-untyped-def, override]
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        self.asked.add(key)
        return super().__getitem__(key)


def settings_in_code() -> set[str]:
    from django_ws.conf import DEFAULTS
    from uwsgi_ws.app import FRONT_PID_VAR
    from uwsgi_ws.config import Config

    names = {"WEBSOCKET_URL", *DEFAULTS}
    env = _Recording()
    Config.from_env(env)  # every variable the websocket instance reads
    names |= env.asked | {FRONT_PID_VAR}
    for path in (ROOT / "django_ws").rglob("*.py"):
        names |= set(re.findall(r"os\.environ\.get\(\"([A-Z0-9_]+)\"", path.read_text()))
    names |= set(re.findall(r"^if-env = ([A-Z0-9_]+)$", (ROOT / "uwsgi.ini.example").read_text(), re.M))
    return names


def test_every_setting_in_the_code_is_in_the_reference(project):
    in_code = settings_in_code()
    assert {"REDIS_URL", "HISTORY_SIZE", "DJANGO_WS_POOL_SIZE", "DJANGO_WS_HTTP", "DJANGO_WS_UWSGI_BIN"} <= in_code
    documented = documented_settings()
    assert sorted(in_code - set(documented)) == []


def test_every_setting_row_has_a_type_a_default_and_an_effect():
    rows = documented_settings()
    assert len(rows) > 40
    incomplete = {name: cells for name, cells in rows.items() if len(cells) != 3 or not all(cells)}
    assert incomplete == {}


def test_the_settings_check_catches_a_setting_left_out(project, monkeypatch):
    """The check is not vacuous: a key added to DEFAULTS without a row is reported."""
    from django_ws import conf

    monkeypatch.setitem(conf.DEFAULTS, "NOT_DOCUMENTED_ANYWHERE", 1)
    assert sorted(settings_in_code() - set(documented_settings())) == ["NOT_DOCUMENTED_ANYWHERE"]


# --------------------------------------------------------------------------- API and client


def test_the_api_reference_documents_every_public_name(html):
    import django_ws
    import django_ws.testing
    from uwsgi_ws import exceptions

    ids = parse(html / "reference" / "api.html").ids
    expected = {f"django_ws.{name}" for name in ("publish", "disconnect")}
    expected |= {
        f"uwsgi_ws.exceptions.{name}"
        for name in dir(exceptions)
        if name[0].isupper()
        and isinstance(getattr(exceptions, name), type)
        and issubclass(getattr(exceptions, name), Exception)
    }
    expected |= {f"django_ws.testing.{name}" for name in django_ws.testing.__all__}
    for name in django_ws.__all__:
        if name not in ("publish", "disconnect"):
            assert f"uwsgi_ws.exceptions.{name}" in expected, name
    assert sorted(expected - ids) == []


def test_the_client_sizes_in_the_docs_are_those_of_the_builds():
    text = (DOCS / "reference" / "client.md").read_text()
    static = ROOT / "django_ws" / "static" / "django_ws"
    for name in ("django_ws.mjs", "django_ws.js", "django_ws.min.js"):
        data = (static / name).read_bytes()
        [row] = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
        size, gzipped = re.findall(r"\| ([\d,]+) bytes", row)
        assert int(size.replace(",", "")) == len(data), name
        assert int(gzipped.replace(",", "")) == len(gzip.compress(data, 9, mtime=0)), name
