"""Prometheus metrics of the Django side: ``publish()`` calls, errors and latency.

They live in prometheus_client's default registry, created on the first publish (not
at import), so whatever exports the project's metrics exports them too: its own
``/metrics`` view, django-prometheus, or prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``) for the several processes of a uWSGI front. Without
prometheus_client installed nothing is counted.
"""

from __future__ import annotations

import threading
from typing import Any

# Every metric the Django side exports: name -> (type, help).
METRICS: dict[str, tuple[str, str]] = {
    "django_ws_publish_calls_total": ("counter", "publish() and disconnect() calls that reached Redis."),
    "django_ws_publish_errors_total": ("counter", "publish() and disconnect() calls that failed (Redis)."),
    "django_ws_publish_seconds": ("histogram", "Time of a publish() call's round trip(s) to Redis."),
}
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_lock = threading.Lock()
_metrics: dict[str, Any] | None = None


def _get() -> dict[str, Any]:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                try:
                    from prometheus_client import Counter, Histogram
                except ImportError:
                    _metrics = {}
                else:
                    _metrics = {
                        "calls": Counter(
                            "django_ws_publish_calls", METRICS["django_ws_publish_calls_total"][1]
                        ),
                        "errors": Counter(
                            "django_ws_publish_errors", METRICS["django_ws_publish_errors_total"][1]
                        ),
                        "seconds": Histogram(
                            "django_ws_publish_seconds",
                            METRICS["django_ws_publish_seconds"][1],
                            buckets=_LATENCY_BUCKETS,
                        ),
                    }
    return _metrics


def published(seconds: float) -> None:
    """Count one publish call that Redis took, in ``seconds``."""
    metrics = _get()
    if metrics:
        metrics["calls"].inc()
        metrics["seconds"].observe(seconds)


def failed() -> None:
    """Count one publish call that failed."""
    metrics = _get()
    if metrics:
        metrics["errors"].inc()
