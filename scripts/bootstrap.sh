#!/usr/bin/env bash
# Install everything the project needs, from nothing:
#   - system packages (Redis server, build tools and the SSL/PCRE headers uWSGI needs),
#     with apt-get when run as root, otherwise a message saying what to install;
#   - a virtualenv (.venv, or $VENV) with the project and its test dependencies;
#   - uWSGI compiled from source with SSL (websocket handshake) and PCRE (routing),
#     then checked: pip can silently build or reuse a uWSGI without them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
UWSGI_VERSION=${UWSGI_VERSION:-2.0.31}
EXTRAS=${EXTRAS:-test}

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v gcc >/dev/null || missing+=(gcc)
command -v make >/dev/null || missing+=(make)
for pkg in libssl-dev libpcre2-dev python3-dev python3-venv pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
# The browser tests drive Debian's Chromium (never a downloaded browser); node runs
# the browser client's unit tests; nginx checks docs/howto/deploy.md's proxy configuration.
# SKIP_BROWSER=1 leaves them out (the demo needs none of them).
if [ "${SKIP_BROWSER:-0}" != 1 ]; then
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)  # npm ci: the browser client's minifier
  [ -x /usr/sbin/nginx ] || missing+=(nginx-light)  # the deployment guide's nginx configuration is tested
fi
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing system packages: ${missing[*]}" >&2
    echo "install them (e.g. sudo apt-get install ${missing[*]}) and run this again" >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtualenv $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v '^WARNING: Location' || true

uwsgi_ok() {
  [ -x "$VENV/bin/uwsgi" ] || return 1
  local help
  help=$("$VENV/bin/uwsgi" --help 2>/dev/null) || return 1
  # --https-socket exists only with SSL, --response-route-if only with PCRE routing.
  grep -q -- '--https-socket ' <<<"$help" && grep -q -- '--response-route-if ' <<<"$help" \
    && grep -q -- '--gevent ' <<<"$help"
}
if ! uwsgi_ok; then
  say "building uWSGI $UWSGI_VERSION from source with SSL and PCRE (about a minute)"
  "$PY" -m pip install -q --force-reinstall --no-binary uwsgi --no-cache-dir "uwsgi==$UWSGI_VERSION" 2>&1 \
    | grep -v '^WARNING: Location' || true
  uwsgi_ok || { echo "uWSGI was built without SSL or PCRE routing: check libssl-dev and libpcre2-dev" >&2; exit 1; }
fi

# The browser client's build tools (the minifier), pinned by client/package-lock.json:
# the builds of django_ws.mjs are committed, and the tests check that they are fresh.
if [ "${SKIP_BROWSER:-0}" != 1 ] && command -v npm >/dev/null; then
  say "installing the browser client's build tools (npm ci in client/)"
  (cd client && npm ci --no-audit --no-fund --loglevel=error)
fi

say "installing the project with extras [$EXTRAS]"
"$PY" -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v '^WARNING: Location' || true
say "ready: $("$VENV/bin/uwsgi" --version) with SSL and PCRE; $("$PY" -c 'import django; print("Django", django.get_version())')"
