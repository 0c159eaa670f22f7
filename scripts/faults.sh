#!/usr/bin/env bash
# Faults at scale: scripts/faults.sh [CONNECTIONS] [options of bench/faults.py]  (default 5000)
# CONNECTIONS websockets on one websocket instance behind its front, each on the
# broadcast channel and its own user channel, 200 messages/s published throughout;
# then Redis restarts (keeping and losing its data), a Sentinel failover, a Cluster
# master killed, a websocket worker killed, a graceful reload of the websocket
# instance and a reload of the front. Prints one row per fault; the exit status says
# whether every row met the requirements (nothing duplicated or lost, no 1011, at most
# one history read per channel). CI runs it with 1000 (tests/test_faults.py).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
ulimit -n "$(ulimit -Hn)"
exec "$VENV/bin/python" bench/faults.py --connections "${1:-${CONNECTIONS:-5000}}" "${@:2}"
