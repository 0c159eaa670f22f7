"""Faults at scale: scripts/faults.sh's harness at 1,000 websockets, every row checked.

One run (bench/faults.py) of every fault: Redis restarts keeping and losing its data,
a Sentinel failover, a Cluster master killed with its replica promoted, a websocket
worker killed, graceful reloads of the websocket instance and of the front; 200
messages a second published throughout, to the broadcast channel and to each
client's own user channel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CONNECTIONS = int(os.environ.get("FAULTS_CONNECTIONS", "1000"))

FAULTS = [
    "Redis restart keeping its data",
    "Redis restart losing its data",
    "Sentinel failover (primary SIGKILLed)",
    "Cluster master SIGKILLed (replica promoted)",
    "websocket worker SIGKILLed",
    "graceful reload of the websocket instance",
    "reload of the front instance",
]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "rows.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "faults.py"), "--connections", str(CONNECTIONS), "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    print(result.stdout)
    assert out.exists(), result.stderr[-3000:]
    return {row["fault"]: row for row in json.loads(out.read_text())}


pytestmark = pytest.mark.timeout(300)


def test_every_fault_ran(rows):
    assert list(rows) == FAULTS
    for row in rows.values():
        assert row["connections"] == CONNECTIONS
        assert row["published"] > 0 and row["owed"] > 0


@pytest.mark.parametrize("fault", FAULTS)
def test_nothing_duplicated_nothing_lost(rows, fault):
    row = rows[fault]
    assert (row["duplicated"], row["lost"]) == (0, 0), row
    assert row["live"] + row["recovered"] == row["owed"], row


@pytest.mark.parametrize("fault", FAULTS)
def test_no_internal_error(rows, fault):
    assert "1011" not in rows[fault]["close_codes"], rows[fault]


@pytest.mark.parametrize("fault", FAULTS)
def test_recovered_false_only_where_the_history_was_lost(rows, fault):
    expected = CONNECTIONS if fault == "Redis restart losing its data" else 0
    assert rows[fault]["not_recovered"] == expected, rows[fault]


@pytest.mark.parametrize("fault", FAULTS)
def test_history_reads_are_bounded_by_the_channels_not_the_sockets(rows, fault):
    # Each socket has its own user channel: sockets + 1 channels. A worker that read
    # the broadcast channel once per socket would make about 2 reads per channel.
    assert rows[fault]["reads_per_channel"] <= 1.1, rows[fault]
