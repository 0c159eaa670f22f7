"""``manage.py ws_drain ADDRESS``: drain a websocket instance through Redis."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from uwsgi_ws.ops import Registry


class Command(BaseCommand):
    help = (
        "Drain the websocket instance at ADDRESS (as in OFFLOAD_TO): its workers stop taking "
        "connections and close theirs with 1012 over DJANGO_WS_DRAIN_WINDOW; --cancel undoes it."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("address", help="the instance's address, as the registry and ws_status show it")
        parser.add_argument("--cancel", action="store_true", help="take connections again")

    def handle(self, *args: Any, **options: Any) -> None:
        from redis.exceptions import RedisError

        from django_ws.conf import get_settings
        from django_ws.publishing import get_redis

        conf = get_settings()
        registry = Registry(get_redis(), conf.prefix)
        try:
            if options["cancel"]:
                registry.cancel_drain(options["address"])
                self.stdout.write(f"drain of {options['address']} cancelled\n")
                return
            known = {i.address for i in registry.instances()}
            if options["address"] not in known:
                raise CommandError(
                    f"no live instance at {options['address']!r}; live: {', '.join(sorted(known)) or 'none'}"
                )
            registry.order_drain(options["address"])
        except RedisError as exc:
            raise CommandError(f"cannot reach Redis at {conf.redis_url}: {type(exc).__name__}") from None
        self.stdout.write(f"drain of {options['address']} ordered\n")
