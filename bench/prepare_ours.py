"""Prepare the example project's database for the benchmark: migrate, then create
one anonymous session per connection of the targeted mix (bulk insert).

Usage: EXAMPLE_DB=... python bench/prepare_ours.py COUNT KEYS.json
Each websocket of the targeted mix sends its own session cookie and subscribes
with ?subscribe-session, so each has a channel of its own.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "example"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chat.settings")

import django  # noqa: E402

django.setup()

from django.contrib.sessions.backends.db import SessionStore  # noqa: E402
from django.contrib.sessions.models import Session  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.utils import timezone  # noqa: E402
from django.utils.crypto import get_random_string  # noqa: E402


def main() -> None:
    count, target = int(sys.argv[1]), Path(sys.argv[2])
    call_command("migrate", verbosity=0)
    data = SessionStore().encode({"bench": True})
    expires = timezone.now() + timedelta(days=1)
    keys = [get_random_string(32, "abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(count)]
    Session.objects.bulk_create(
        [Session(session_key=k, session_data=data, expire_date=expires) for k in keys], batch_size=2000
    )
    target.write_text(json.dumps(keys))


if __name__ == "__main__":
    main()
