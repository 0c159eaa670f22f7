#!/usr/bin/env bash
# Run the example chat: installs what is missing, starts a private Redis (unless
# DJANGO_WS_REDIS_URL is given), prepares the database and demo users, starts the
# whole uWSGI stack (uwsgi.ini.example) and prints the URL to open. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SKIP_BROWSER=${SKIP_BROWSER:-1} EXTRAS=${EXTRAS:-server,django} scripts/bootstrap.sh
PY="$ROOT/${VENV:-.venv}/bin/python"
export PATH="$ROOT/${VENV:-.venv}/bin:$PATH"
RUN="$ROOT/.demo"
mkdir -p "$RUN"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

if [ -z "${DJANGO_WS_REDIS_URL:-}" ]; then
  port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    --logfile "$RUN/redis.log" &
  pids+=($!)
  export DJANGO_WS_REDIS_URL="redis://127.0.0.1:$port/0"
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  echo "private Redis on port $port"
fi

export EXAMPLE_DB="${EXAMPLE_DB:-$RUN/db.sqlite3}"
export DJANGO_WS_HTTP="${DJANGO_WS_HTTP:-127.0.0.1:8000}"
# The hand-over socket: DJANGO_WS_OFFLOAD_TO if set, else the ini's default, a unix
# socket in a directory only this user may enter. The ticket secret has no default:
# a fresh random one for this run, unless one is given.
export DJANGO_WS_SECRET="${DJANGO_WS_SECRET:-$("$PY" -c 'import secrets; print(secrets.token_hex(32))')}"
(cd example && "$PY" manage.py migrate -v0 && "$PY" manage.py demo_users)

uwsgi --ini uwsgi.ini.example --logto "$RUN/uwsgi.log" &
pids+=($!)
for _ in $(seq 100); do
  curl -s -o /dev/null "http://$DJANGO_WS_HTTP/" && break
  sleep 0.1
done
cat <<MSG

  The example chat is running: open http://$DJANGO_WS_HTTP/
  Log in as alice, bob or carol (password: demo) in two browsers and chat.
  Logs: $RUN/uwsgi.log   Stop: Ctrl-C

MSG
wait "${pids[-1]}"
