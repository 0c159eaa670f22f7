"""Settings of the peer: a minimal Django Channels 4 project (bench only)."""

import os

SECRET_KEY = "bench-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["channels"]
ROOT_URLCONF = None
DATABASES = {}
USE_TZ = True
ASGI_APPLICATION = "asgi.application"
CHANNEL_LAYERS = {
    "default": {
        # The layer the Channels documentation recommends for production.
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # Defaults otherwise (capacity 100, expiry 60). bench/run.py installs redis-py < 8:
        # see PEER_REQUIREMENTS there.
        "CONFIG": {"hosts": [os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")]},
    }
}
LOGGING = {"version": 1, "disable_existing_loggers": False, "root": {"handlers": [], "level": "WARNING"}}
