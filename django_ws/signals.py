"""Signals sent when presence changes, by ``manage.py ws_events``.

Each is sent with ``sender`` set to the facility name and these keyword arguments:

* ``channel``: the channel's label (``"broadcast"``, ``"user"``, ``"group:staff"``);
* ``audience``: its :class:`~uwsgi_ws.protocol.Audience` (for a user channel, the
  username is ``audience.name``);
* ``user``: the username that joined or left (``""`` for the channel signals);
* ``info``: what ``PRESENCE_INFO`` returned for the connection that joined (or None);
* ``at``: Unix time at which the websocket instance saw the change;
* ``event_id``: the change's id in the Redis stream (unique, increasing).

``member_joined`` / ``member_left``: a user's first connection to the channel opened,
its last one closed (or its worker died and its lease ended). ``channel_occupied`` /
``channel_vacated``: the channel's first connection (any user, or anonymous) opened,
its last one closed.
"""

from __future__ import annotations

from django.dispatch import Signal

member_joined = Signal()
member_left = Signal()
channel_occupied = Signal()
channel_vacated = Signal()

SIGNALS = {
    "joined": member_joined,
    "left": member_left,
    "occupied": channel_occupied,
    "vacated": channel_vacated,
}
