"""``manage.py ws_events``: presence changes become Django signals, each sent once.

Real copies of the command (subprocesses of the example project) read the stream the
websocket instance writes while real websockets come and go.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid

import pytest

import django_ws
from tests.conftest import EXAMPLE, WS, stop, wait_for
from uwsgi_ws.presence import Occupancy


class Copy:
    """One running ``manage.py ws_events -v 2``, its output lines collected."""

    def __init__(self, project, group: str, name: str) -> None:
        env = {**os.environ, **project.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "ws_events", "-v", "2", "--group", group, "--name", name],
            cwd=EXAMPLE,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: any(line.startswith("consuming") for line in self.lines), what="ws_events started")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def changes(self, facility: str) -> list[tuple[str, str, str, str]]:
        """(id, kind, channel, user) of the changes it sent for ``facility``."""
        out = []
        for line in list(self.lines):
            parts = line.split(" ", 4)
            if len(parts) >= 4 and parts[2] == facility:
                out.append((parts[0], parts[1], parts[3], parts[4] if len(parts) == 5 else ""))
        return out

    def stop(self) -> None:
        stop(self.proc, signal.SIGTERM)
        self._reader.join(5)


@pytest.mark.timeout(120)
def test_each_change_is_sent_once_by_two_copies_and_after_a_restart(offload_stack, project, facility):
    group = "g" + uuid.uuid4().hex[:8]
    copies = [Copy(project, group, "one"), Copy(project, group, "two")]
    try:
        url = offload_stack.url(f"/ws/{facility}?subscribe-broadcast")
        sockets = []
        for user in ("alice", "alice", "bob", "carol"):
            ws = WS(url, session=project.cookie(user))
            ws.ready()
            sockets.append(ws)
        for ws in sockets:
            ws.close()
        wait_for(lambda: django_ws.presence_count(facility, broadcast=True) == Occupancy(0, 0, 0), what="all left")

        def sent() -> list[tuple[str, str, str, str]]:
            return [c for copy in copies for c in copy.changes(facility)]

        wait_for(lambda: len(sent()) >= 8, what="the changes sent")
        changes = sent()
        assert len({c[0] for c in changes}) == len(changes) == 8  # once each, by one copy or the other
        kinds = sorted((kind, user) for _, kind, _, user in changes)
        assert kinds == [
            ("joined", "alice"),
            ("joined", "bob"),
            ("joined", "carol"),
            ("left", "alice"),
            ("left", "bob"),
            ("left", "carol"),
            ("occupied", ""),
            ("vacated", ""),
        ]
        for copy in copies:
            copy.stop()

        # Changes made while no copy runs are sent when one starts again.
        ws = WS(url, session=project.cookie("bob"))
        ws.ready()
        ws.close()
        wait_for(lambda: django_ws.presence_count(facility, broadcast=True) == Occupancy(0, 0, 0), what="bob left")
        again = Copy(project, group, "one")
        copies.append(again)
        wait_for(lambda: len(again.changes(facility)) >= 4, what="the changes made meanwhile")
        assert sorted((k, u) for _, k, _, u in again.changes(facility)) == [
            ("joined", "bob"),
            ("left", "bob"),
            ("occupied", ""),
            ("vacated", ""),
        ]
        assert not {c[0] for c in again.changes(facility)} & {c[0] for c in changes}
    finally:
        for copy in copies:
            copy.stop()


def test_receivers_get_the_signal_arguments(project, redis_server, facility):
    from django_ws.events import Consumer
    from django_ws.publishing import get_redis
    from django_ws.signals import member_joined
    from uwsgi_ws.presence import PresenceTracker
    from uwsgi_ws.protocol import Audience, Kind, channel_name

    got = []

    def receiver(sender, **kwargs):
        got.append((sender, kwargs))

    member_joined.connect(receiver)
    try:
        consumer = Consumer(get_redis(), group="g" + uuid.uuid4().hex[:8], name="test", block=0.2)
        consumer.start()
        tracker = PresenceTracker(get_redis(), "ws", background=False)
        chan = channel_name("ws", facility, Audience(Kind.GROUP, "red"))
        tracker.join("c1", [chan], user="alice", info={"name": "Alice"}, ttl=30, stream_size=100, since=1.0)
        tracker.leave("c1", [chan], user="alice", stream_size=100)
        wait_for(lambda: consumer.run_once() and got, what="the signal")
        sender, kwargs = got[0]
        assert sender == facility
        assert (kwargs["channel"], kwargs["audience"], kwargs["user"], kwargs["info"]) == (
            "group:red",
            Audience(Kind.GROUP, "red"),
            "alice",
            {"name": "Alice"},
        )
        assert isinstance(kwargs["at"], float) and kwargs["event_id"]
    finally:
        member_joined.disconnect(receiver)


def test_changes_a_dead_copy_held_are_taken_over(project, redis_server, facility):
    from django_ws.events import Consumer
    from django_ws.publishing import get_redis
    from uwsgi_ws.presence import PresenceTracker
    from uwsgi_ws.protocol import Audience, Kind, channel_name, presence_events_key

    group = "g" + uuid.uuid4().hex[:8]
    client = get_redis()
    Consumer(client, group=group, name="first").start()
    tracker = PresenceTracker(client, "ws", background=False)
    chan = channel_name("ws", facility, Audience(Kind.BROADCAST))
    tracker.join("c1", [chan], user="alice", info=None, ttl=30, stream_size=100, since=1.0)
    # A copy reads the changes, then dies before acknowledging them.
    [(_, taken)] = client.xreadgroup(group, "dead", {presence_events_key("ws"): ">"}, count=100)
    ours = [i for i, f in taken if f[b"channel"].decode() == chan]
    assert len(ours) == 2  # occupied, joined
    sent = []
    other = Consumer(client, group=group, name="other", claim_idle=0.2, block=0.1, on_event=sent.append)
    wait_for(lambda: other.run_once() and {e.id for e in sent} >= {i.decode() for i in ours}, what="the take-over")
    assert sorted(e.kind for e in sent if e.id in {i.decode() for i in ours}) == ["joined", "occupied"]
    tracker.leave("c1", [chan], user="alice", stream_size=100)


def test_the_consumer_sweeps_the_leaves_of_dead_workers(project, redis_server, facility):
    from django_ws.events import Consumer
    from django_ws.publishing import get_redis
    from uwsgi_ws.presence import PresenceTracker
    from uwsgi_ws.protocol import Audience, Kind, channel_name

    client = get_redis()
    sent = []
    consumer = Consumer(client, group="g" + uuid.uuid4().hex[:8], name="one", block=0.1, on_event=sent.append)
    consumer.start()
    consumer._sweep_every = 0.1  # the example's PRESENCE_TTL is 30 s
    chan = channel_name("ws", facility, Audience(Kind.BROADCAST))
    dead = PresenceTracker(client, "ws", background=False)
    dead.join("c1", [chan], user="bob", info=None, ttl=1.0, stream_size=100, since=1.0)
    # No websocket worker renews or reaps anything: the consumer's sweep does.
    wait_for(
        lambda: consumer.run_once() is not None and any(e.kind == "left" and e.user == "bob" for e in sent),
        what="bob's leave",
    )
    assert django_ws.presence_count(facility, broadcast=True) == Occupancy(0, 0, 0)


def test_ws_events_refuses_to_wait_for_nothing(project, ws_settings):
    from django.core.management import CommandError, call_command

    ws_settings(PRESENCE_STREAM_SIZE=0)
    with pytest.raises(CommandError, match="PRESENCE_STREAM_SIZE"):
        call_command("ws_events")
