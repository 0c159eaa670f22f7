"""The benchmark's quick mode, for our stack only: it runs, and nothing is lost.

Runs ``bench/run.py --quick --only ours --n 100`` (a private Redis and uWSGI stack,
100 websockets, one broadcast round, 2 s of targeted messages) and checks the JSON it
writes. The peer (Django Channels) is left out: it needs its own virtualenv from
PyPI; ``make bench-quick`` runs both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("picows", reason="the load generator needs picows (pip install picows)")


@pytest.mark.timeout(240)
def test_quick_benchmark_of_our_stack(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "bench" / "run.py"),
        "--quick",
        "--only",
        "ours",
        "--n",
        "100",
        "--no-report",
        "--no-install",
        "--round-timeout",
        "20",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    [run] = result["runs"]
    assert run["system"] == "ours" and run["n"] == 100
    assert "error" not in run, run.get("error")
    assert run["connect"]["established"] == 100, run["connect"]
    assert run["dropped_by_server"] == 0
    broadcast = run["broadcast"]
    assert broadcast["delivered"] == broadcast["expected"] == 100
    assert broadcast["lost"] == 0 and broadcast["duplicates"] == 0
    targeted = run["targeted"]
    assert targeted["sent"] > 0
    assert targeted["delivered"] == targeted["expected"] == targeted["sent"]
    assert targeted["lost"] == 0 and targeted["duplicates"] == 0 and targeted["misdelivered"] == 0
    # The Hub's promise: Redis connections do not grow with the websockets.
    assert run["redis_clients"]["by_name"].get("django_ws:hub") == 1
