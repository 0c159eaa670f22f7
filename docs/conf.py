"""Sphinx configuration of the django-uwsgi-ws documentation (furo, MyST, autodoc).

Built by tests/test_docs.py with warnings as errors:
    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "example"))

# autodoc imports django_ws, whose modules need configured settings: the example's.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chat.settings")
import django  # noqa: E402

django.setup()

import uwsgi_ws  # noqa: E402

project = "django-uwsgi-ws"
author = "the django-uwsgi-ws authors"
copyright = "2026, " + author
release = uwsgi_ws.__version__  # the one version of the package
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# Markdown: anchors for headings down to ###, so that [text](page.md#a-heading) links
# are checked like any other cross-reference (a missing one is a warning, so an error).
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"django-uwsgi-ws {release}"
