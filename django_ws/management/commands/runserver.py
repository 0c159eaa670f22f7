"""``runserver`` that also serves websockets under WEBSOCKET_URL (one thread each)."""

from __future__ import annotations

from typing import Any

from django.apps import apps

from django_ws.conf import get_settings
from django_ws.devserver import WebSocketDevServer
from django_ws.wsgi import WebSocketWSGIHandler

if apps.is_installed("django.contrib.staticfiles"):
    from django.contrib.staticfiles.management.commands.runserver import Command as BaseCommand
else:
    from django.core.management.commands.runserver import Command as BaseCommand


class Command(BaseCommand):
    help = BaseCommand.help + " Websockets under WEBSOCKET_URL are served too (django_ws)."
    server_cls = WebSocketDevServer

    def get_handler(self, *args: Any, **options: Any) -> Any:
        self._threaded = options.get("use_threading", True)
        return WebSocketWSGIHandler(super().get_handler(*args, **options))

    def on_bind(self, server_port: int) -> None:
        super().on_bind(server_port)
        host = f"[{self.addr}]" if self._raw_ipv6 else ("0.0.0.0" if self.addr == "0" else self.addr)
        url = get_settings().url
        self.stdout.write(f"Websockets are served at ws://{host}:{server_port}{url}<facility> (django_ws).")
        if not getattr(self, "_threaded", True):
            self.stdout.write(self.style.WARNING("Without threading, one open websocket blocks every other request."))
