#!/usr/bin/env bash
# Soak test: scripts/soak.sh [MINUTES] [CONNECTIONS]  (defaults: 10 minutes, 3000 websockets)
# Thousands of websockets with churn (disconnect, reconnect with recovery) and steady
# publishing against the offload stack; checks at the end that every message reached
# every subscriber exactly once, in order, and that memory and Redis connections did
# not grow. CI runs a one-minute version as part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_MINUTES="${1:-${MINUTES:-10}}" SOAK_CONNECTIONS="${2:-${CONNECTIONS:-3000}}"
exec scripts/test.sh tests/test_soak.py -s -q "${@:3}"
