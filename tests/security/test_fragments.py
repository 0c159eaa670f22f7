"""A message sent in many tiny fragments: its memory is its size, not many times it.

Pure logic (the connection core, no socket): the frames are built with wsproto's
client side, as a client library would send them.
"""

from __future__ import annotations

import tracemalloc

from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from uwsgi_ws.core import Publish, SessionCore, State
from uwsgi_ws.protocol import Limits, Ticket


def test_a_message_in_two_byte_fragments_takes_its_size_in_memory():
    ticket = Ticket(subscribe={}, publish=("{ws:f:broadcast}",), limits=Limits(max_message_size=65536), expires=1e12)
    core = SessionCore(ticket, sender=b"me", now=0.0)
    core.subscribed()
    assert core.state is State.OPEN
    client = Connection(ConnectionType.CLIENT)
    fragments = 30_000  # 60 KB: under MAX_MESSAGE_SIZE
    data = b"".join(client.send(TextMessage("ab", message_finished=False)) for _ in range(fragments))
    data += client.send(TextMessage("b", message_finished=True))
    core.receive(data, 0.0)
    del data
    tracemalloc.start()
    try:
        actions: list = []
        baseline, _ = tracemalloc.get_traced_memory()
        peak = 0
        more = True
        while more:
            batch, more = core.process(0.0)
            actions += batch
            current, _ = tracemalloc.get_traced_memory()
            peak = max(peak, current - baseline)
    finally:
        tracemalloc.stop()
    [publish] = [a for a in actions if isinstance(a, Publish)]
    assert publish.payload == b"ab" * fragments + b"b"
    print(f"\n{fragments} two-byte fragments held {peak / 1024:.0f} KiB at most while being received")
    assert peak < 256 * 1024  # 60 KB of message, not megabytes of fragment objects
