"""Push a live notification to the example chat from the command line."""

from django.core.management.base import BaseCommand, CommandError

import django_ws


class Command(BaseCommand):
    help = "Send a notification to everyone on the chat page, or to some users (--user)."

    def add_arguments(self, parser):
        parser.add_argument("text", help="the notification text")
        parser.add_argument("--user", action="append", default=[], help="only to this user (repeatable)")

    def handle(self, text, user, **options):
        payload = {"kind": "notification", "text": text}
        try:
            published = django_ws.publish("chat", payload, users=user, broadcast=not user)
        except django_ws.PublishError as exc:
            raise CommandError(str(exc)) from None
        live = sum(p.receivers for p in published)
        self.stdout.write(f"sent to {', '.join(user) or 'everyone'} ({live} websocket worker(s) listening)")
