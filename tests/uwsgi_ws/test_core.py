"""The connection core with plain values: no Redis, no socket, no clock."""

from __future__ import annotations

import json

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from uwsgi_ws.core import (
    CLOSE_HEARTBEAT_TIMEOUT,
    CLOSE_POLICY_VIOLATION,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_OLD,
    EVENTS_PER_BATCH,
    HEARTBEAT_FRAME,
    REFUSALS,
    EventStreamCore,
    Finish,
    Publish,
    ReadHistory,
    Send,
    SessionCore,
    State,
)
from uwsgi_ws.protocol import (
    KIND_BINARY,
    KIND_TEXT,
    Envelope,
    Limits,
    Position,
    Ticket,
    parse_event_id,
)
from uwsgi_ws.store import ChannelState

CHANNEL = "{ws:f:broadcast}"
OTHER = "{ws:f:user:alice}"
ME = b"me"


def ticket(**kw) -> Ticket:
    base = dict(subscribe={"broadcast": CHANNEL}, limits=Limits(heartbeat=10, rate=1, burst=3), expires=1e12)
    base.update(kw)
    return Ticket(**base)


def env(offset: int, epoch: str = "e", sender: bytes = b"x", payload: bytes | None = None) -> Envelope:
    return Envelope(sender, KIND_TEXT, offset, epoch, payload or f"m{offset}".encode())


def state(top: int, history: range | list[int] = (), epoch: str | None = "e") -> ChannelState:
    return ChannelState(epoch, top, tuple(env(o, epoch or "") for o in history))


def frames(actions) -> list[dict]:
    """Decode the text frames (unmasked, short) the core asked to send."""
    out = []
    for action in actions:
        if not isinstance(action, Send):
            continue
        data = action.data
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        start = 2 if n < 126 else 4
        if opcode == 0x1:
            out.append(json.loads(data[start:]))
        elif opcode == 0x8:
            out.append({"type": "close", "code": int.from_bytes(data[start : start + 2], "big")})
        elif opcode == 0x9:
            out.append({"type": "ping"})
        elif opcode == 0xA:
            out.append({"type": "pong"})
    return out


def data_of(actions) -> list[str]:
    return [f["data"] for f in frames(actions) if f["type"] == "message"]


def started(core: SessionCore, *states: ChannelState) -> list:
    actions = core.subscribed()
    assert isinstance(actions[0], ReadHistory)
    return core.history_read(list(states))


def client_bytes(*events) -> bytes:
    client = Connection(ConnectionType.CLIENT)
    return b"".join(client.send(e) for e in events)


def feed(core: SessionCore, data: bytes, now: float = 1.0) -> list:
    core.receive(data, now)
    actions = []
    while True:
        batch, more = core.process(now)
        actions += batch
        if not more:
            return actions


# --------------------------------------------------------------------------- start


def test_subscribing_reads_history_with_the_recovery_positions():
    core = SessionCore(ticket(recover={"broadcast": Position(3, "e")}, latest=True), sender=ME, now=0)
    assert core.state is State.SUBSCRIBING
    [read] = core.subscribed()
    assert read == ReadHistory(((CHANNEL, Position(3, "e"), True),))
    assert core.state is State.SYNCING
    assert core.subscribed() == []  # once


def test_replay_then_subscribed_then_ready():
    core = SessionCore(ticket(recover={"broadcast": Position(3, "e")}), sender=ME, now=0)
    actions = started(core, state(5, [4, 5]))
    assert [f["type"] for f in frames(actions)] == ["message", "message", "subscribed", "ready"]
    assert data_of(actions) == ["m4", "m5"]
    subscribed = {"type": "subscribed", "channel": "broadcast", "offset": 5, "epoch": "e", "recovered": True}
    assert frames(actions)[2] == subscribed
    assert frames(actions)[3]["sender"] == "me"
    assert core.state is State.OPEN


def test_no_channels_is_ready_at_once():
    core = SessionCore(ticket(subscribe={}, publish=(CHANNEL,)), sender=ME, now=0)
    assert [f["type"] for f in frames(core.subscribed())] == ["ready"]


@pytest.mark.parametrize(
    "since,st,recovered,offset",
    [
        (Position(2, "e"), state(5, [4, 5]), False, 5),  # gap: 3 was trimmed
        (Position(2, "old"), state(5, [3, 4, 5]), False, 5),  # Redis lost the channel: new epoch
        (Position(7, "e"), state(5, [5]), False, 5),  # a position from the future
        (Position(0, ""), state(2, [1, 2]), True, 2),  # from the start, any epoch
        (Position(0, ""), state(0, [], epoch=None), True, 0),  # nothing was ever published
        (Position(4, "e"), state(0, [], epoch=None), False, 0),  # the channel is gone
        (None, state(5, [5]), None, 5),  # nothing asked
    ],
)
def test_recovery_outcomes(since, st, recovered, offset):
    recover = {"broadcast": since} if since else {}
    core = SessionCore(ticket(recover=recover), sender=ME, now=0)
    subscribed = [f for f in frames(started(core, st)) if f["type"] == "subscribed"][0]
    assert (subscribed["recovered"], subscribed["offset"]) == (recovered, offset)


# --------------------------------------------------------------------------- live vs history


def all_orders(top: int, live: list[int]):
    """Every way live messages can interleave with the subscription and history read."""
    for split in range(len(live) + 1):
        yield live[:split], live[split:]  # held before the read finished, delivered after


@pytest.mark.parametrize("since", [0, 2])
@pytest.mark.parametrize("top", [2, 3, 5])
def test_every_interleaving_of_live_messages_and_history_delivers_each_once_in_order(since, top):
    # Messages 1..top are in history when it is read; live copies of some of them
    # (the Hub saw them too) and later ones arrive before and after the read.
    for live_from in range(since + 1, top + 2):
        live = list(range(live_from, top + 4))
        for before, after in all_orders(top, live):
            core = SessionCore(ticket(recover={"broadcast": Position(since, "e")}), sender=ME, now=0)
            core.subscribed()
            actions = []
            for o in before:
                actions += core.hub_message(CHANNEL, env(o), None)
            assert actions == []  # held while the history is read
            actions += core.history_read([state(top, range(1, top + 1))])
            for o in after:
                actions += core.hub_message(CHANNEL, env(o), None)
            assert data_of(actions) == [f"m{o}" for o in range(since + 1, top + 4)], (live_from, before, after)


def test_duplicates_and_old_messages_are_dropped_live():
    core = SessionCore(ticket(), sender=ME, now=0)
    started(core, state(0, [], epoch=None))
    actions = []
    for o in (1, 2, 2, 1, 3):
        actions += core.hub_message(CHANNEL, env(o), None)
    assert data_of(actions) == ["m1", "m2", "m3"]


def test_a_new_epoch_starts_over():
    core = SessionCore(ticket(), sender=ME, now=0)
    started(core, state(7, [7]))
    actions = core.hub_message(CHANNEL, env(8), None) + core.hub_message(CHANNEL, env(1, epoch="new"), None)
    assert data_of(actions) == ["m8", "m1"]
    assert core.positions[CHANNEL] == Position(1, "new")


def test_own_messages_are_not_echoed_unless_asked_but_count():
    mine = env(1, sender=ME)
    for echo, expected in ((False, []), (True, ["m1"])):
        core = SessionCore(ticket(echo=echo), sender=ME, now=0)
        started(core, state(0, [], epoch=None))
        assert data_of(core.hub_message(CHANNEL, mine, None)) == expected
        assert core.positions[CHANNEL] == Position(1, "e")


def test_the_hubs_shared_frame_is_sent_as_is():
    core = SessionCore(ticket(), sender=ME, now=0)
    started(core, state(0, [], epoch=None))
    assert core.hub_message(CHANNEL, env(1), b"shared bytes") == [Send(b"shared bytes")]


def test_channels_are_independent():
    core = SessionCore(ticket(subscribe={"broadcast": CHANNEL, "user": OTHER}), sender=ME, now=0)
    core.subscribed()
    held = core.hub_message(OTHER, env(1), None)
    actions = core.history_read([state(0, [], epoch=None), state(0, [], epoch=None)])
    assert held == [] and data_of(actions) == ["m1"]
    assert [f["channel"] for f in frames(actions) if f["type"] == "subscribed"] == ["broadcast", "user"]


def test_resynced_after_a_hub_reconnection_tells_the_client_where_it_stands():
    core = SessionCore(ticket(), sender=ME, now=0)
    started(core, state(3, [3]))
    delivered = core.hub_message(CHANNEL, env(4), None)  # the Hub replays what it found
    [ok] = frames(core.resynced(CHANNEL, True, Position(4, "e")))
    assert data_of(delivered) == ["m4"]
    assert (ok["recovered"], ok["offset"]) == (True, 4)
    [lost] = frames(core.resynced(CHANNEL, False, Position(9, "f")))
    assert (lost["recovered"], lost["offset"], lost["epoch"]) == (False, 9, "f")
    assert data_of(core.hub_message(CHANNEL, env(9, "f"), None)) == []  # at 9 already


def test_resynced_while_still_syncing_is_ignored():
    core = SessionCore(ticket(), sender=ME, now=0)
    core.subscribed()
    assert core.resynced(CHANNEL, False, Position(9, "f")) == []


# --------------------------------------------------------------------------- closing


def close_in(state_name: str) -> SessionCore:
    core = SessionCore(ticket(), sender=ME, now=0)
    if state_name in ("syncing", "open"):
        core.subscribed()
    if state_name == "open":
        core.history_read([state(0, [], epoch=None)])
    return core


@pytest.mark.parametrize("where", ["subscribing", "syncing", "open"])
def test_close_in_every_state_sends_one_close_and_then_nothing(where):
    core = close_in(where)
    actions = core.close(4100, "bye")
    assert frames(actions) == [{"type": "close", "code": 4100}]
    assert actions[-1] == Finish(4100)
    assert core.state is State.CLOSING
    # Nothing after Close: no message, no heartbeat, no second close, no replay.
    assert core.hub_message(CHANNEL, env(1), None) == []
    assert core.timer(1000) == []
    assert core.close(1000) == [] and core.overflow() == []
    assert core.history_read([state(1, [1])]) == []
    assert core.resynced(CHANNEL, True, Position(1, "e")) == []
    core.closed()
    assert core.state is State.CLOSED


def test_overflow_discards_the_queue_then_closes_4008():
    core = close_in("open")
    actions = core.overflow()
    assert actions[0] == Finish(CLOSE_SLOW_CONSUMER, discard=True)
    assert frames(actions) == [{"type": "close", "code": CLOSE_SLOW_CONSUMER}]
    assert core.hub_message(CHANNEL, env(1), None) == []


def test_failed_subscription_or_read_closes_1013():
    for where in ("subscribing", "syncing"):
        core = close_in(where)
        assert frames(core.failed()) == [{"type": "close", "code": 1013}]


def test_the_client_closing_is_answered():
    core = close_in("open")
    actions = feed(core, client_bytes(CloseConnection(1000, "done")))
    assert frames(actions) == [{"type": "close", "code": 1000}]
    assert actions[-1] == Finish(1000)
    assert core.hub_message(CHANNEL, env(1), None) == []


def test_invalid_utf8_closes_1007():
    core = close_in("open")
    raw = bytearray(client_bytes(TextMessage("ab")))
    raw[-1] = 0xFF ^ raw[3]  # the second byte unmasks to 0xff: invalid UTF-8 (mask bytes 2-5)
    actions = feed(core, bytes(raw))
    assert frames(actions) == [{"type": "close", "code": 1007}]


# --------------------------------------------------------------------------- timers


def test_heartbeats_by_the_clock_and_silent_clients_are_closed():
    core = close_in("open")
    assert core.next_timer == 10
    assert core.timer(5) == []
    assert frames(core.timer(10)) == [{"type": "ping"}, {"type": "heartbeat"}]
    assert core.next_timer == 20
    core.receive(client_bytes(Ping(b"")), 15)  # the client is alive
    feed(core, b"", 15)
    assert frames(core.timer(40)) == [{"type": "ping"}, {"type": "heartbeat"}]
    actions = core.timer(50)  # nothing heard since 15: 35 > 3 intervals
    assert frames(actions) == [{"type": "close", "code": CLOSE_HEARTBEAT_TIMEOUT}]


def test_event_streams_need_no_answer_to_heartbeats():
    core = EventStreamCore(ticket(), sender=ME, now=0)
    core.subscribed()
    core.history_read([state(0, [], epoch=None)])
    for now in (10, 20, 30, 40, 50):
        assert core.timer(now) == [Send(b'event: heartbeat\ndata: {"type":"heartbeat"}\n\n')]


def test_max_age_closes_4010():
    core = SessionCore(ticket(max_age=25.0), sender=ME, now=0)
    core.subscribed()
    core.history_read([state(0, [], epoch=None)])
    assert core.next_timer == 10
    core.timer(10)
    core.timer(20)
    assert core.next_timer == 25
    assert frames(core.timer(25)) == [{"type": "close", "code": CLOSE_TOO_OLD}]


def test_heartbeat_frame_is_the_wire_format():
    assert json.loads(HEARTBEAT_FRAME[2:]) == {"type": "heartbeat"}


# --------------------------------------------------------------------------- client messages


def test_messages_are_published_one_by_one():
    core = SessionCore(ticket(publish=(CHANNEL,)), sender=ME, now=0)
    started(core, state(0, [], epoch=None))
    actions = feed(core, client_bytes(TextMessage("hi"), BytesMessage(b"\x00\x01")))
    assert actions == [Publish(KIND_TEXT, b"hi"), Publish(KIND_BINARY, b"\x00\x01")]


def test_fragments_are_joined_and_the_size_bounded():
    core = SessionCore(ticket(publish=(CHANNEL,), limits=Limits(max_message_size=5)), sender=ME, now=0)
    started(core, state(0, [], epoch=None))
    actions = feed(core, client_bytes(TextMessage("ab", message_finished=False), TextMessage("c")))
    assert actions == [Publish(KIND_TEXT, b"abc")]
    actions = feed(core, client_bytes(TextMessage("abc", message_finished=False), TextMessage("def")))
    assert frames(actions) == [{"type": "close", "code": 1009}]


def test_pings_are_answered():
    core = close_in("open")
    assert frames(feed(core, client_bytes(Ping(b"x")))) == [{"type": "pong"}]


@pytest.mark.parametrize("publish", [(), (CHANNEL,)])
def test_a_client_that_keeps_sending_refused_messages_is_closed_1008(publish):
    # Without rights every message is refused; with rights (1/s, burst 3) the flood is.
    core = SessionCore(ticket(publish=publish), sender=ME, now=0)
    started(core, state(0, [], epoch=None))
    actions = feed(core, client_bytes(*[TextMessage("x")] * 20), now=1.0)
    errors = [f for f in frames(actions) if f["type"] == "error"]
    code = "forbidden" if not publish else "rate_limited"
    assert [e["code"] for e in errors] == [code] * REFUSALS
    assert frames(actions)[-1] == {"type": "close", "code": CLOSE_POLICY_VIOLATION}
    assert sum(isinstance(a, Publish) for a in actions) == (3 if publish else 0)
    assert core.state is State.CLOSING


def test_an_occasional_refusal_is_forgiven():
    core = SessionCore(ticket(), sender=ME, now=0)
    started(core, state(0, [], epoch=None))
    for minute in range(10):
        actions = feed(core, client_bytes(TextMessage("x")), now=60.0 * minute)
        assert [f["code"] for f in frames(actions)] == ["forbidden"]
    assert core.state is State.OPEN


def test_publish_outcomes():
    core = SessionCore(ticket(publish=(CHANNEL,)), sender=ME, now=0)
    started(core, state(0, [], epoch=None))
    assert core.published(None, 1) == []
    assert [f["code"] for f in frames(core.published("unavailable", 1))] == ["unavailable"]
    assert [f["code"] for f in frames(core.published("rate_limited", 1))] == ["rate_limited"]


def test_work_per_call_is_bounded():
    core = SessionCore(ticket(publish=(CHANNEL,), limits=Limits(rate=0)), sender=ME, now=0)
    started(core, state(0, [], epoch=None))
    core.receive(client_bytes(*[Ping(b"")] * (3 * EVENTS_PER_BATCH + 5)), 1)
    batches = []
    while True:
        actions, more = core.process(1)
        batches.append(len(actions))
        if not more:
            break
    assert batches[:3] == [EVENTS_PER_BATCH] * 3 and sum(batches) == 3 * EVENTS_PER_BATCH + 5


# --------------------------------------------------------------------------- event streams


def test_event_stream_ids_carry_every_position():
    core = EventStreamCore(ticket(subscribe={"broadcast": CHANNEL, "user": OTHER}), sender=ME, now=0)
    core.subscribed()
    core.history_read([state(2, [2]), state(0, [], epoch=None)])
    [send] = core.hub_message(OTHER, env(1, "u"), None)
    head = send.data.decode().split("\n")
    assert head[0].startswith("id: ") and head[1] == "event: message"
    assert parse_event_id(head[0][4:]) == {"broadcast": Position(2, "e"), "user": Position(1, "u")}
    [close] = core.close(4100, "bye")[:1]
    assert close.data.startswith(b"event: close\n")
    assert core.receive(b"ignored", 1) is None and core.process(1) == ([], False)


# --------------------------------------------------------------------------- presence events

EVENTS = "{ws:f:broadcast}:presence"


def presence_env(document: dict, offset: int = 1) -> Envelope:
    from uwsgi_ws.protocol import KIND_JSON

    return Envelope(b"", KIND_JSON, offset, "p", json.dumps(document).encode())


def open_core(**kw) -> SessionCore:
    core = SessionCore(ticket(**kw), sender=ME, now=0.0)
    core.subscribed()
    core.history_read([state(0)])
    return core


def test_presence_events_become_join_and_leave_frames():
    core = open_core(presence=(CHANNEL,), presence_events=(CHANNEL,), presence_user="carol")
    assert core.event_channels == (EVENTS,)
    join = core.live(EVENTS, presence_env({"type": "join", "user": "alice", "info": {"n": 1}}), None)
    leave = core.live(EVENTS, presence_env({"type": "leave", "user": "alice"}, 2), None)
    assert frames([Send(join), Send(leave)]) == [
        {"type": "join", "channel": "broadcast", "user": "alice", "info": {"n": 1}},
        {"type": "leave", "channel": "broadcast", "user": "alice"},
    ]


@pytest.mark.parametrize(
    "document",
    [{"type": "join", "user": "carol"}, {"type": "message", "user": "x"}, {"type": "join"}, {"user": 3}],
)
def test_own_user_and_malformed_presence_events_are_dropped(document):
    core = open_core(presence=(CHANNEL,), presence_events=(CHANNEL,), presence_user="carol")
    assert core.live(EVENTS, presence_env(document), None) is None


def test_no_presence_events_before_ready_or_without_asking():
    core = SessionCore(ticket(presence=(CHANNEL,), presence_events=(CHANNEL,)), sender=ME, now=0.0)
    assert core.live(EVENTS, presence_env({"type": "join", "user": "alice"}), None) is None
    assert open_core(presence=(CHANNEL,)).event_channels == ()


def test_event_streams_name_presence_events():
    core = EventStreamCore(ticket(presence=(CHANNEL,), presence_events=(CHANNEL,)), sender=ME, now=0.0)
    core.subscribed()
    core.history_read([state(0)])
    data = core.live(EVENTS, presence_env({"type": "leave", "user": "bob"}), None)
    assert data == b'event: leave\ndata: {"type":"leave","channel":"broadcast","user":"bob"}\n\n'


# --------------------------------------------------------------------------- unsubscribe


def test_unsubscribe_stops_a_channel_at_once_and_says_so():
    core = SessionCore(ticket(subscribe={"broadcast": CHANNEL, "user": OTHER}), sender=ME, now=0.0)
    started(core, state(0), state(0))
    assert frames(core.unsubscribe([OTHER])) == [{"type": "unsubscribed", "channel": "user"}]
    assert core.live(OTHER, env(1), None) is None
    assert core.live(CHANNEL, env(1), None) is not None  # the other channel goes on
    assert core.unsubscribe([OTHER]) == []  # once


def test_unsubscribe_while_the_history_is_read():
    core = SessionCore(ticket(subscribe={"broadcast": CHANNEL, "user": OTHER}), sender=ME, now=0.0)
    core.subscribed()
    core.live(OTHER, env(1), None)  # held during the read
    core.unsubscribe([OTHER])
    actions = core.history_read([state(0), state(1, [1])])
    assert [f["type"] for f in frames(actions)] == ["subscribed", "ready"]
    assert data_of(actions) == []


def test_event_streams_name_the_unsubscribed_event():
    core = EventStreamCore(ticket(), sender=ME, now=0.0)
    started(core, state(0))
    [send] = core.unsubscribe([CHANNEL])
    assert send.data == b'event: unsubscribed\ndata: {"type":"unsubscribed","channel":"broadcast"}\n\n'
