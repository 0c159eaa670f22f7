#!/usr/bin/env bash
# Run the test suite (after scripts/bootstrap.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# Tests open more than a thousand websockets: raise the open-files limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec "$VENV/bin/python" -m pytest "$@"
