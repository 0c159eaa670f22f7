"""``manage.py ws_events``: send Django signals for presence changes (see django_ws.events)."""

from __future__ import annotations

import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from django_ws.events import DEFAULT_GROUP, Consumer, Event
from django_ws.publishing import get_redis


class Command(BaseCommand):
    help = (
        "Send member_joined, member_left, channel_occupied and channel_vacated for every presence "
        "change. Run one or more copies: each change is sent once, and a restart resumes."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--group", default=DEFAULT_GROUP, help="consumer group shared by the copies")
        parser.add_argument("--name", default=None, help="this copy's name in the group (default: host:pid)")
        parser.add_argument(
            "--claim-idle",
            type=float,
            default=60.0,
            help="seconds after which changes given to a copy that stopped answering are taken over",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from django_ws.conf import get_settings

        conf = get_settings()
        if not conf.presence or conf.presence_stream_size == 0:
            raise CommandError(
                "no presence changes are recorded: set DJANGO_WS['PRESENCE'] to True and "
                "DJANGO_WS['PRESENCE_STREAM_SIZE'] above 0"
            )
        verbosity = options["verbosity"]

        def shown(event: Event) -> None:
            if verbosity >= 2:
                self.stdout.write(f"{event.id} {event.kind} {event.facility} {event.channel} {event.user}")
                self.stdout.flush()

        consumer = Consumer(
            get_redis(), group=options["group"], name=options["name"], claim_idle=options["claim_idle"], on_event=shown
        )

        def stop(signum: int, frame: Any) -> None:
            consumer.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        consumer.start()
        if verbosity >= 1:
            self.stdout.write(f"consuming presence changes as {consumer.name} in group {consumer.group}")
            self.stdout.flush()
        consumer.run()
