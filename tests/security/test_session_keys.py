"""A session key is a login credential: it must never leave Django.

Whoever reads a Redis key or channel name (``KEYS *``, ``PUBSUB CHANNELS``), a ticket
or a log line must not find a session key there: they carry its keyed digest.
"""

from __future__ import annotations

import pytest

import django_ws
from django_ws.identity import session_digest
from tests.conftest import WS, start_stack, stop
from tests.direct import new_key
from tests.security.helpers import django_ticket, ticket_text


def _everything_redis_names(client) -> str:
    names = [k.decode() for k in client.keys("*")]
    names += [c.decode() for c in client.pubsub_channels()]
    names += [c.decode() for c in client.execute_command("PUBSUB", "SHARDCHANNELS")]
    return "\n".join(names)


def _session_scenario(stack, project, facility: str) -> tuple[str, str, list[WS]]:
    """Use a logged-in session and an anonymous one every way there is; return both keys."""
    alice = project.cookie("alice")
    anonymous = project.anonymous_session()
    sockets = [
        WS(stack.url(f"/ws/{facility}?subscribe-session&subscribe-user&subscribe-broadcast"), session=alice),
        WS(stack.url(f"/ws/{facility}?subscribe-session"), session=anonymous),
    ]
    for ws in sockets:
        ws.ready()
    django_ws.publish(facility, "to alice's session", sessions=[alice])
    django_ws.publish(facility, "to the anonymous session", sessions=[anonymous])
    assert sockets[0].next()["data"] == "to alice's session"
    assert sockets[1].next()["data"] == "to the anonymous session"
    # A refusal is logged: an anonymous session asking for a user channel.
    import websocket

    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        WS(stack.url(f"/ws/{facility}?subscribe-user&subscribe-session"), session=anonymous)
    assert refused.value.status_code == 403
    return alice, anonymous, sockets


def test_session_keys_appear_nowhere_outside_django(offload_stack, project, redis_server, facility):
    alice, anonymous, sockets = _session_scenario(offload_stack, project, facility)
    try:
        names = _everything_redis_names(redis_server.client())
        # The session channels exist, under their digests (the test is looking at the right place).
        assert "{ws:" + f"{facility}:session:{session_digest(alice)}" + "}" in names
        assert "{ws:" + f"{facility}:session:{session_digest(anonymous)}" + "}" in names
        for key in (alice, anonymous):
            assert key not in names
            token = django_ticket(f"/ws/{facility}?subscribe-session&subscribe-broadcast", session=key, key=new_key())
            assert session_digest(key) in ticket_text(token)
            assert key not in token and key not in ticket_text(token)
        # Every log line of both instances (front and websocket), refusals included.
        log = offload_stack.log.read_text(errors="replace")
        assert f"/ws/{facility}" in log
        assert alice not in log and anonymous not in log
    finally:
        for ws in sockets:
            ws.close()


def test_session_keys_are_not_sharded_channel_names(project, redis_server, tmp_path, facility, ws_settings):
    ws_settings(PUBLISH_COMMAND="SPUBLISH")
    stack = start_stack("offload", project, tmp_path, DJANGO_WS_PUBLISH_COMMAND="SPUBLISH")
    try:
        alice, anonymous, sockets = _session_scenario(stack, project, facility)
        client = redis_server.client()
        shard_channels = "\n".join(c.decode() for c in client.execute_command("PUBSUB", "SHARDCHANNELS"))
        assert session_digest(alice) in shard_channels  # sharded pub/sub really in use
        names = _everything_redis_names(client)
        assert alice not in names and anonymous not in names
        log = stack.log.read_text(errors="replace")
        assert alice not in log and anonymous not in log
        for ws in sockets:
            ws.close()
    finally:
        for proc in stack.procs:
            stop(proc)


def test_publishing_to_a_session_reaches_it_by_its_digest(offload_stack, project, facility):
    # publish(sessions=[key]) maps the key exactly as the middleware does.
    key = project.anonymous_session()
    ws = WS(offload_stack.url(f"/ws/{facility}?subscribe-session"), session=key)
    ws.ready()
    [published] = django_ws.publish(facility, "hello", sessions=[key])
    assert published.channel == "{ws:" + f"{facility}:session:{session_digest(key)}" + "}"
    assert ws.next()["data"] == "hello"
    ws.close()


def test_the_digest_needs_the_secret_key(project):
    from django.test import override_settings

    key = "k" * 32
    first = session_digest(key)
    assert key not in first and len(first) == 40
    with override_settings(SECRET_KEY="another secret key for this test only"):
        assert session_digest(key) != first
