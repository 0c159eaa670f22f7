"""Absurd recover positions: the cost is bounded by the kept history, not by the offsets."""

from __future__ import annotations

import base64
import json
import time
import urllib.parse

import pytest
import websocket

import django_ws
from tests.security.hostile_clients import PeakRSS, websocket_worker_pids
from tests.test_sse import EventStream
from uwsgi_ws.protocol import meta_key

MAX_OFFSET = 2**63 - 1  # what Redis counts to (HINCRBY on a signed 64-bit integer)


def _recover(positions: dict[str, list]) -> str:
    return urllib.parse.quote(json.dumps(positions))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("top", [10**7, 10**12])
def test_recovering_on_a_channel_with_a_huge_counter_is_cheap(stack, connect, redis_server, facility, top):
    """A channel whose counter stands at ``top``, with a few kept messages.

    Recovering from offset 0 (any epoch) or from an old position in the right epoch
    cannot succeed; both are answered at once with ``recovered: false``, other
    clients of the worker are served meanwhile, and the worker's memory does not jump
    (its RSS is sampled every 5 ms meanwhile).
    """
    for i in range(5):
        [published] = django_ws.publish(facility, f"kept {i}", broadcast=True)
    redis_server.client().hset(meta_key(published.channel), "offset", top)
    bystander_facility = f"{facility}-other"
    bystander = connect("", path=f"/ws/{bystander_facility}?subscribe-broadcast")
    bystander.ready()
    answers = []
    with PeakRSS(websocket_worker_pids(stack)) as rss:
        for since in ([0, ""], [3, published.epoch]):
            started = time.monotonic()
            frames = connect(f"subscribe-broadcast&recover={_recover({'broadcast': since})}").ready()
            answers.append((since, frames, time.monotonic() - started))
            django_ws.publish(bystander_facility, f"after recovering from {since}", broadcast=True)
            assert bystander.next()["data"] == f"after recovering from {since}"
    grown = rss.growth_kb
    for since, frames, elapsed in answers:
        print(f"\n{stack.mode}: top {top}, recover from {since}: {elapsed * 1000:.0f} ms; peak RSS +{grown} kB")
        assert frames == [
            {"type": "subscribed", "channel": "broadcast", "offset": top, "epoch": published.epoch, "recovered": False}
        ]
        assert elapsed < 5.0
    assert grown < 20 * 1024


@pytest.mark.parametrize("offset", [2**63, 2**64])
def test_recover_offsets_beyond_what_redis_counts_are_refused_with_400(connect, offset):
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        connect(f"subscribe-broadcast&recover={_recover({'broadcast': [offset, 'E']})}")
    assert refused.value.status_code == 400


@pytest.mark.parametrize("offset", [2**63, 2**64])
def test_last_event_id_offsets_beyond_what_redis_counts_are_refused_with_400(stack, facility, offset):
    document = json.dumps({"broadcast": [offset, "E"]}).encode()
    last_event_id = base64.urlsafe_b64encode(document).rstrip(b"=").decode()
    es = EventStream(stack, f"/ws/{facility}?subscribe-broadcast", last_event_id=last_event_id)
    try:
        assert es.response.status == 400
    finally:
        es.close()


def test_the_largest_offset_is_accepted(connect):
    """2^63-1 (where Redis stops counting) is a position like any other: not recovered here."""
    [subscribed] = connect(f"subscribe-broadcast&recover={_recover({'broadcast': [MAX_OFFSET, 'E']})}").ready()
    assert subscribed["recovered"] is False
