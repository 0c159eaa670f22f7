#!/usr/bin/env bash
# The multi-host test bed by hand (needs root): six Redis hosts (a Cluster of three
# masters with a replica each), two websocket hosts running the example chat, one
# client host, each a network namespace with an address from 192.0.2.0/24 and no
# route outside. Prints how to run a command on each host; Ctrl-C (or SIGTERM) tears
# everything down. `scripts/cluster-lab.sh clean` removes beds left by a killed run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m tests.lab "$@"
