"""A ticket opens one connection: the handshake it was made for, once.

Tickets travel from the front to the websocket instance next to the client's
cookies; one that leaks (a log, a proxy, a packet capture, a race) must not open a
second connection, not even within its lifetime.
"""

from __future__ import annotations

from tests.direct import handshake_vars, new_key, status_line
from tests.security.helpers import django_ticket


def test_a_ticket_is_accepted_once_and_replays_get_403(offload_stack, project, facility):
    key = new_key()
    token = django_ticket(f"/ws/{facility}?subscribe-broadcast", key=key)
    assert status_line(offload_stack, handshake_vars(token, key=key)).startswith(b"HTTP/1.1 101")
    replays = [status_line(offload_stack, handshake_vars(token, key=key)) for _ in range(5)]
    assert replays == [b"HTTP/1.1 403 Forbidden"] * 5


def test_a_ticket_only_serves_the_handshake_it_was_made_for(offload_stack, project, facility):
    token = django_ticket(f"/ws/{facility}?subscribe-broadcast", key=new_key())
    # First use, but with another connection's key: refused, and the ticket is not spent
    # by the attempt either way (it stays useless to the thief).
    assert status_line(offload_stack, handshake_vars(token, key=new_key())) == b"HTTP/1.1 403 Forbidden"


def test_an_event_stream_ticket_is_accepted_once(offload_stack, project, facility):
    token = django_ticket(f"/ws/{facility}?subscribe-broadcast", stream=True)
    assert status_line(offload_stack, handshake_vars(token, key="", stream=True)) == b"HTTP/1.1 200 OK"
    again = [status_line(offload_stack, handshake_vars(token, key="", stream=True)) for _ in range(3)]
    assert again == [b"HTTP/1.1 403 Forbidden"] * 3


def test_a_websocket_ticket_does_not_open_an_event_stream(offload_stack, project, facility):
    # Made for a websocket: without its upgrade the request is not served at all.
    token = django_ticket(f"/ws/{facility}?subscribe-broadcast", key=new_key())
    answer = status_line(offload_stack, handshake_vars(token, key="", stream=True))
    assert answer == b"HTTP/1.1 426 Upgrade Required"
