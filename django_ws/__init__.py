"""Real-time push from Django to browsers over websockets, uWSGI and Redis.

Call :func:`publish` from views, management commands or task workers.
"""

from __future__ import annotations

from uwsgi_ws.exceptions import PublishError

from .publishing import publish

__all__ = ["publish", "PublishError"]
