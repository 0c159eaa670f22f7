"""ASGI application of the peer: websockets only, on /ws/bench."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "peer_settings")

import django  # noqa: E402

django.setup()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from consumers import BenchConsumer  # noqa: E402
from django.urls import path  # noqa: E402

application = ProtocolTypeRouter({"websocket": URLRouter([path("ws/bench", BenchConsumer.as_asgi())])})
