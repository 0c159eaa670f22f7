"""Settings of the example chat project (development values; see docs/howto/deploy.md for production)."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret-change-me")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"] + [
    h for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(",") if h
]

INSTALLED_APPS = [
    # before staticfiles, so that its runserver (which also serves websockets) wins
    "django_ws",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django_ws.middleware.WebSocketMiddleware",
]

ROOT_URLCONF = "chat.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django_ws.context_processors.websocket",
            ]
        },
    }
]
WSGI_APPLICATION = "chat.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_DB", str(BASE_DIR / "db.sqlite3")),
        "OPTIONS": {"timeout": 20},
    }
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_TZ = True
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

# Behind a proxy that terminates TLS and sets X-Forwarded-Proto (nginx in docs/howto/deploy.md):
# pages and the Origin check then see https. Only where that proxy is the sole way in.
if os.environ.get("EXAMPLE_BEHIND_TLS_PROXY") == "1":
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

WEBSOCKET_URL = "/ws/"
_rate, _burst = os.environ.get("DJANGO_WS_RATE_LIMIT", "10,20").split(",")
DJANGO_WS = {
    # Logged-in users may publish from their browser to these audiences...
    "CLIENT_PUBLISH": ("broadcast", "user", "group"),
    # ... of these facilities only (EXAMPLE_FACILITIES adds comma-separated names or
    # glob patterns: the test suite's own facilities).
    "FACILITIES": ["chat", *(f for f in os.environ.get("EXAMPLE_FACILITIES", "").split(",") if f)],
    "HISTORY_SIZE": int(os.environ.get("DJANGO_WS_HISTORY_SIZE", "100")),
    "HISTORY_TTL": float(os.environ.get("DJANGO_WS_HISTORY_TTL", "900")),
    "HISTORY_MAX_BYTES": int(os.environ.get("DJANGO_WS_HISTORY_MAX_BYTES", str(1 << 20))),
    "HEARTBEAT": float(os.environ.get("DJANGO_WS_HEARTBEAT", "20")),
    "RATE_LIMIT": (float(_rate), int(_burst)),
    "ALLOW_MISSING_ORIGIN": os.environ.get("DJANGO_WS_ALLOW_MISSING_ORIGIN", "1") == "1",
    # Who is online: the chat shows each member's display name.
    "PRESENCE_TTL": float(os.environ.get("DJANGO_WS_PRESENCE_TTL", "30")),
    "PRESENCE_INFO": "chat.views.presence_info",
}
# More websocket instances than the one uwsgi.ini.example starts (comma-separated
# addresses): hand-overs take turns. Default: $DJANGO_WS_OFFLOAD_TO, that one instance.
if os.environ.get("EXAMPLE_OFFLOAD_TO"):
    DJANGO_WS["OFFLOAD_TO"] = os.environ["EXAMPLE_OFFLOAD_TO"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_ws": {"handlers": ["console"], "level": "INFO"},
        "uwsgi_ws": {"handlers": ["console"], "level": "INFO"},
    },
}
