from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the demo users alice, bob and carol (password: demo) and the group 'team'."

    def handle(self, *args, **options):
        team, _ = Group.objects.get_or_create(name="team")
        for name in ("alice", "bob", "carol"):
            user, created = User.objects.get_or_create(username=name)
            if created:
                user.set_password("demo")
                user.save()
            if name in ("alice", "bob"):
                user.groups.add(team)
        self.stdout.write("demo users: alice, bob (group team), carol; password: demo")
