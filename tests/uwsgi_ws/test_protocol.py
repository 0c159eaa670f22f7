"""Pure protocol rules, tested with plain values."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uwsgi_ws.exceptions import BadRequest, TicketError
from uwsgi_ws.protocol import (
    KIND_BINARY,
    KIND_JSON,
    KIND_TEXT,
    Audience,
    Envelope,
    Kind,
    Limits,
    Position,
    RateLimiter,
    Ticket,
    accept_key,
    channel_label,
    channel_name,
    check_handshake,
    client_frame,
    decide_recovery,
    decode_envelope,
    encode_event_id,
    encode_payload,
    parse_binary_message,
    parse_channel,
    parse_event_id,
    parse_query,
    sign_ticket,
    validate_facility,
    verify_ticket,
)

SECRET = b"s3cret"


# --------------------------------------------------------------------------- facility


@pytest.mark.parametrize("name", ["chat", "a", "room-1", "foo.bar", "A_b-c.d9", "x" * 64])
def test_valid_facilities(name):
    assert validate_facility(name) == name


@pytest.mark.parametrize(
    "name", ["", "..", "a..b", "a/b", "../etc", "a b", "é", "a\x00", "a\n", ".hidden", "a" * 65, "chat."]
)
def test_invalid_facilities(name):
    with pytest.raises(BadRequest):
        validate_facility(name)


# --------------------------------------------------------------------------- channel names


def test_channels_share_one_hash_tag_per_audience():
    name = channel_name("ws", "chat", Audience(Kind.GROUP, "a{b}:c"))
    # one hash tag, from the first '{' to the first '}': braces in the name are escaped
    assert name.count("{") == 1 and name.count("}") == 1
    assert name.startswith("{") and name.endswith("}")
    assert parse_channel(name) == ("ws", "chat", Audience(Kind.GROUP, "a{b}:c"))


@pytest.mark.parametrize(
    "audience,label",
    [
        (Audience(Kind.BROADCAST), "broadcast"),
        (Audience(Kind.USER, "alice@example.com"), "user"),
        (Audience(Kind.GROUP, "staff members"), "group:staff members"),
        (Audience(Kind.SESSION, "abc123"), "session"),
    ],
)
def test_labels_hide_user_and_session_names(audience, label):
    assert channel_label(channel_name("ws", "f", audience)) == label


def test_distinct_audiences_get_distinct_channels():
    names = {
        channel_name("ws", "f", Audience(Kind.USER, "a")),
        channel_name("ws", "f", Audience(Kind.GROUP, "a")),
        channel_name("ws", "f", Audience(Kind.SESSION, "a")),
        channel_name("ws", "g", Audience(Kind.USER, "a")),
        channel_name("ws", "f", Audience(Kind.BROADCAST)),
    }
    assert len(names) == 5


@given(st.text(min_size=1, max_size=40))
def test_channel_names_round_trip(name):
    channel = channel_name("ws", "f", Audience(Kind.GROUP, name))
    assert parse_channel(channel)[2].name == name
    assert channel.count("{") == 1 and channel.count("}") == 1


# --------------------------------------------------------------------------- query


def test_query_ws4redis_syntax():
    request = parse_query("subscribe-broadcast&subscribe-user&publish-group&echo")
    assert request.subscribe == {Kind.BROADCAST, Kind.USER}
    assert request.publish == {Kind.GROUP}
    assert request.echo and not request.latest


def test_query_recover_positions():
    request = parse_query("subscribe-broadcast&recover=%7B%22broadcast%22%3A%5B3%2C%22e1%22%5D%7D")
    assert request.recover == {"broadcast": Position(3, "e1")}


def test_the_largest_offset_redis_counts_to_is_a_valid_position():
    request = parse_query('subscribe-broadcast&recover={"b":[9223372036854775807,"e"]}')
    assert request.recover == {"b": Position(2**63 - 1, "e")}


@pytest.mark.parametrize("offset", [2**63, 2**64])
def test_last_event_id_offsets_beyond_what_redis_counts_are_refused(offset):
    event_id = encode_event_id({"broadcast": (offset, "e")})
    with pytest.raises(BadRequest) as info:
        parse_event_id(event_id)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "query,fragment",
    [
        ("", "nothing requested"),
        ("echo", "nothing requested"),
        ("subscribe-broadcast&subscribe-broadcast", "twice"),
        ("subscribe-broadcast&bogus", "unknown query parameter"),
        ("subscribe-broadcast=1", "takes no value"),
        ("subscribe-broadcast&recover=nope", "JSON"),
        ('subscribe-broadcast&recover={"b":[-1,"e"]}', "non-negative"),
        ('subscribe-broadcast&recover={"b":[1.5,"e"]}', "non-negative"),
        ("subscribe-broadcast&recover=[1]", "JSON object"),
        ('subscribe-broadcast&recover={"b":[9223372036854775808,"e"]}', "at most 9223372036854775807"),
        ('subscribe-broadcast&recover={"b":[18446744073709551616,"e"]}', "at most 9223372036854775807"),
        ("subscribe-broadcast&" + "x" * 9000, "longer than"),
    ],
)
def test_bad_queries(query, fragment):
    with pytest.raises(BadRequest) as info:
        parse_query(query)
    assert fragment in info.value.message
    assert info.value.status == 400


@given(st.text(max_size=200))
def test_query_parser_only_raises_bad_request(query):
    try:
        parse_query(query)
    except BadRequest:
        pass


# --------------------------------------------------------------------------- tickets


def _ticket(**kw):
    base = dict(subscribe={"broadcast": "{ws:f:broadcast}"}, publish=("{ws:f:broadcast}",), expires=1000.0)
    base.update(kw)
    return Ticket(**base)


def test_ticket_round_trip():
    ticket = _ticket(echo=True, recover={"broadcast": Position(4, "e")}, limits=Limits(rate=0.5))
    assert verify_ticket(sign_ticket(ticket, SECRET), SECRET, now=999.0) == ticket


def test_forged_ticket_is_refused():
    with pytest.raises(TicketError, match="signature"):
        verify_ticket(sign_ticket(_ticket(), b"other secret"), SECRET, now=999.0)


def test_tampered_ticket_is_refused():
    token = sign_ticket(_ticket(), SECRET)
    body, mac = token.split(".")
    forged = json.loads(__import__("base64").urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    forged["s"]["user"] = "{ws:f:user:admin}"
    new_body = __import__("base64").urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(TicketError, match="signature"):
        verify_ticket(new_body + "." + mac, SECRET, now=999.0)


def test_expired_ticket_is_refused_after_leeway():
    token = sign_ticket(_ticket(expires=1000.0), SECRET)
    verify_ticket(token, SECRET, now=1004.0, leeway=5.0)
    with pytest.raises(TicketError, match="expired"):
        verify_ticket(token, SECRET, now=1006.0, leeway=5.0)


@pytest.mark.parametrize("token", [None, "", "abc", "abc.", ".abc", "a.b.c", "é.é"])
def test_malformed_tickets_are_refused(token):
    with pytest.raises(TicketError):
        verify_ticket(token, SECRET, now=0)


@given(st.text(max_size=300))
def test_ticket_parser_only_raises_ticket_error(token):
    with pytest.raises(TicketError):
        verify_ticket(token, SECRET, now=0)


# --------------------------------------------------------------------------- envelopes and frames


@pytest.mark.parametrize(
    "message,kind",
    [("héllo", KIND_TEXT), (b"\x00\xff", KIND_BINARY), ({"a": [1, 2]}, KIND_JSON), (3, KIND_JSON), (None, KIND_JSON)],
)
def test_payload_kinds(message, kind):
    assert encode_payload(message)[0] == kind


def test_unserialisable_message_is_a_type_error():
    with pytest.raises(TypeError, match="JSON-serialisable"):
        encode_payload(object())


def test_envelope_decoding_keeps_newlines_in_payload():
    env = decode_envelope(b"abc\nt\n7\n123.4\nline1\nline2")
    assert env == Envelope(b"abc", b"t", 7, "123.4", b"line1\nline2")


def _unframe(frame: bytes) -> tuple[int, bytes]:
    opcode = frame[0] & 0x0F
    n = frame[1] & 0x7F
    if n == 126:
        n, start = struct.unpack("!H", frame[2:4])[0], 4
    elif n == 127:
        n, start = struct.unpack("!Q", frame[2:10])[0], 10
    else:
        start = 2
    assert frame[0] & 0x80 and not frame[1] & 0x80  # final, unmasked
    assert len(frame) == start + n
    return opcode, frame[start:]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_text_client_frames_carry_position_and_data(size):
    text = "x" * size
    opcode, payload = _unframe(client_frame("broadcast", Envelope(b"", KIND_TEXT, 5, "e", text.encode())))
    assert opcode == 1
    assert json.loads(payload) == {"type": "message", "channel": "broadcast", "offset": 5, "epoch": "e", "data": text}


def test_json_messages_arrive_decoded():
    _, payload = _unframe(client_frame("user", Envelope(b"", KIND_JSON, 1, "e", b'{"a":1}')))
    assert json.loads(payload)["data"] == {"a": 1}


def test_binary_messages_stay_binary():
    opcode, payload = _unframe(client_frame("group:x", Envelope(b"", KIND_BINARY, 2, "e", b"\x00\x01")))
    assert opcode == 2
    header, data = parse_binary_message(payload)
    assert header == {"type": "message", "channel": "group:x", "offset": 2, "epoch": "e"}
    assert data == b"\x00\x01"


# --------------------------------------------------------------------------- recovery


def _envs(*offsets, epoch="E"):
    return [Envelope(b"", KIND_TEXT, o, epoch, b"m%d" % o) for o in offsets]


def test_first_connection_recovers_nothing():
    outcome = decide_recovery(None, "E", 9, [])
    assert outcome.recovered is None and outcome.envelopes == () and outcome.position == Position(9, "E")


def test_latest_delivers_the_last_kept_message():
    outcome = decide_recovery(None, "E", 9, _envs(9), latest=True)
    assert [e.offset for e in outcome.envelopes] == [9]


def test_missed_messages_are_recovered_in_order():
    outcome = decide_recovery(Position(3, "E"), "E", 6, _envs(4, 5, 6))
    assert outcome.recovered is True
    assert [e.offset for e in outcome.envelopes] == [4, 5, 6]


def test_nothing_missed_is_recovered():
    outcome = decide_recovery(Position(6, "E"), "E", 6, [])
    assert outcome.recovered is True and outcome.envelopes == ()


def test_trimmed_history_is_not_recovered():
    assert decide_recovery(Position(1, "E"), "E", 6, _envs(4, 5, 6)).recovered is False


def test_new_epoch_is_not_recovered_but_its_messages_are_delivered():
    # Redis lost the channel: the old epoch's gap is gone, but everything published
    # in the new epoch is still kept, and the client never saw any of it.
    new = _envs(1, 2, 3, 4, 5, 6, epoch="NEW")
    outcome = decide_recovery(Position(3, "OLD"), "NEW", 6, new)
    assert outcome.recovered is False and outcome.envelopes == tuple(new)
    assert outcome.position == Position(6, "NEW")


def test_new_epoch_with_a_gap_delivers_nothing():
    for kept in (_envs(1, 2, 4, 5, 6, epoch="NEW"), _envs(1, 2, 3, epoch="NEW"), []):
        outcome = decide_recovery(Position(3, "OLD"), "NEW", 6, kept)
        assert outcome.recovered is False and outcome.envelopes == ()
        assert outcome.position == Position(6, "NEW")


def test_lost_channel_is_not_recovered():
    assert decide_recovery(Position(3, "E"), None, 0, []).recovered is False


def test_position_ahead_of_the_channel_is_not_recovered():
    assert decide_recovery(Position(9, "E"), "E", 6, []).recovered is False


def test_empty_position_accepts_any_epoch():
    outcome = decide_recovery(Position(0, ""), "E", 2, _envs(1, 2))
    assert outcome.recovered is True and [e.offset for e in outcome.envelopes] == [1, 2]
    assert decide_recovery(Position(0, ""), None, 0, []).recovered is True


# Edge cases of recovery with plain values: whatever the offsets, the decision costs
# no more than the kept history (a client chooses ``since``; Redis's counter may be huge).


def test_a_gap_in_the_history_is_not_recovered():
    outcome = decide_recovery(Position(3, "E"), "E", 7, _envs(4, 5, 7))
    assert outcome.recovered is False and outcome.envelopes == () and outcome.position == Position(7, "E")


def test_a_duplicated_entry_is_not_taken_for_a_missing_one():
    assert decide_recovery(Position(3, "E"), "E", 6, _envs(4, 5, 5)).recovered is False
    assert decide_recovery(Position(3, "E"), "E", 5, _envs(4, 4, 5)).recovered is False


def test_entries_the_client_already_has_are_not_sent_again():
    outcome = decide_recovery(Position(4, "E"), "E", 6, _envs(3, 4, 5, 6))
    assert outcome.recovered is True and [e.offset for e in outcome.envelopes] == [5, 6]


def test_a_position_ahead_of_the_channel_with_history_is_not_recovered():
    outcome = decide_recovery(Position(9, "E"), "E", 6, _envs(4, 5, 6))
    assert outcome.recovered is False and outcome.envelopes == () and outcome.position == Position(6, "E")


def test_an_empty_history_recovers_only_when_nothing_was_missed():
    assert decide_recovery(Position(3, "E"), "E", 6, []).recovered is False
    assert decide_recovery(Position(0, ""), "E", 6, []).recovered is False
    assert decide_recovery(Position(6, "E"), "E", 6, []).recovered is True


@pytest.mark.parametrize("top", [10**7, 10**12, 2**63 - 1])
@pytest.mark.parametrize("since", [Position(0, ""), Position(5, "E")])
def test_a_huge_counter_costs_no_more_than_the_history(top, since):
    import tracemalloc

    history = _envs(top - 1, top)
    tracemalloc.start()
    try:
        outcome = decide_recovery(since, "E", top, history)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome.recovered is False and outcome.envelopes == () and outcome.position == Position(top, "E")
    assert peak < 64 * 1024


def test_a_huge_counter_still_recovers_what_is_kept():
    top = 10**12
    outcome = decide_recovery(Position(top - 2, "E"), "E", top, _envs(top - 3, top - 2, top - 1, top))
    assert outcome.recovered is True and [e.offset for e in outcome.envelopes] == [top - 1, top]


# --------------------------------------------------------------------------- limits and handshake


def test_rate_limiter_refills_over_time():
    limiter = RateLimiter(2.0, 3, now=0.0)
    assert [limiter.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow(0.5) is True
    assert limiter.allow(0.5) is False


def test_rate_limiter_zero_rate_is_unlimited():
    limiter = RateLimiter(0, 0)
    assert all(limiter.allow(0.0) for _ in range(100))


GOOD = {
    "HTTP_UPGRADE": "websocket",
    "HTTP_CONNECTION": "keep-alive, Upgrade",
    "HTTP_SEC_WEBSOCKET_VERSION": "13",
    "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
}


def test_good_handshake_and_accept_key():
    key = check_handshake("GET", GOOD)
    assert accept_key(key) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # the RFC 6455 example


@pytest.mark.parametrize(
    "method,changes,status",
    [
        ("POST", {}, 405),
        ("GET", {"HTTP_UPGRADE": ""}, 426),
        ("GET", {"HTTP_CONNECTION": "keep-alive"}, 400),
        ("GET", {"HTTP_SEC_WEBSOCKET_VERSION": "8"}, 426),
        ("GET", {"HTTP_SEC_WEBSOCKET_KEY": "short"}, 400),
        ("GET", {"HTTP_SEC_WEBSOCKET_KEY": "é"}, 400),
    ],
)
def test_bad_handshakes(method, changes, status):
    with pytest.raises(BadRequest) as info:
        check_handshake(method, {**GOOD, **changes})
    assert info.value.status == status


@given(st.binary(max_size=200))
def test_envelope_parser_only_raises_value_error(raw):
    try:
        decode_envelope(raw)
    except ValueError:
        pass


@given(st.binary(max_size=200))
def test_binary_message_parser_only_raises_value_error(raw):
    try:
        parse_binary_message(raw)
    except ValueError:
        pass


@given(st.text(max_size=80))
def test_facility_validation_only_raises_bad_request(name):
    try:
        assert validate_facility(name) == name
    except BadRequest:
        return
    assert ".." not in name and "/" not in name and name.isascii() and name.isprintable()


def test_websocket_instance_without_a_secret_answers_500_not_a_traceback(monkeypatch):
    from uwsgi_ws.app import WebSocketApplication

    monkeypatch.delenv("DJANGO_WS_SECRET", raising=False)
    answered = []
    body = WebSocketApplication()({"REQUEST_METHOD": "GET"}, lambda status, headers: answered.append(status))
    assert answered == ["500 Internal Server Error"] and b"Traceback" not in b"".join(body)


def test_unsubscribe_orders_round_trip_and_malformed_ones_are_refused():
    from uwsgi_ws.protocol import Unsubscribe, decode_control, encode_unsubscribe

    order = Unsubscribe(("user:bob",), "group:red", "chat", 12.5)
    assert decode_control(encode_unsubscribe(order)) == order
    assert decode_control(encode_unsubscribe(Unsubscribe(("user:bob",), "broadcast"))).facility is None
    for bad in (
        b'{"type":"unsubscribe","tags":["u"],"audience":3,"facility":null,"issued":1}',
        b'{"type":"unsubscribe","tags":["u"],"audience":"broadcast","issued":1}',
        b'{"type":"subscribe","tags":["u"],"audience":"broadcast","facility":null,"issued":1}',
    ):
        with pytest.raises(ValueError):
            decode_control(bad)


def test_presence_fields_of_a_ticket_round_trip_by_label():
    from uwsgi_ws.protocol import Ticket, sign_ticket, verify_ticket

    subscribe = {"broadcast": "{ws:f:broadcast}", "group:a": "{ws:f:group:a}", "session": "{ws:f:session:d}"}
    ticket = Ticket(
        subscribe=subscribe,
        expires=1e12,
        presence=("{ws:f:broadcast}", "{ws:f:group:a}"),
        presence_events=("{ws:f:group:a}",),
        presence_user="alice",
        presence_info={"n": 1},
        presence_ttl=12.0,
        presence_stream=5,
    )
    token = sign_ticket(ticket, b"s" * 32)
    assert verify_ticket(token, b"s" * 32) == ticket
    assert "{ws:f:group:a}" not in json.dumps(ticket.to_dict()["ps"])  # labels, not channel names


def test_envelopes_carry_the_publish_time_after_the_sender():
    from uwsgi_ws.protocol import stamp_sender

    stamped = stamp_sender(b"abc", now=1700000000.25)
    assert stamped == b"abc@1700000000.250000"
    env = decode_envelope(stamped + b"\nt\n7\n123.4\nline1\nline2")
    assert (env.sender, env.published, env.payload) == (b"abc", 1700000000.25, b"line1\nline2")
    # published before stamps existed: no time, the sender as it was
    old = decode_envelope(b"abc\nt\n7\n123.4\nx")
    assert (old.sender, old.published) == (b"abc", 0.0)
    with pytest.raises(ValueError):
        decode_envelope(b"abc@soon\nt\n7\n123.4\nx")


@pytest.mark.parametrize(
    "name,value",
    [("DJANGO_WS_METRICS", "maybe"), ("DJANGO_WS_DRAIN_WINDOW", "-1"), ("DJANGO_WS_PREFIX", "bad prefix!")],
)
def test_operations_variables_are_checked(name, value):
    from uwsgi_ws.config import Config
    from uwsgi_ws.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match=name.replace("DJANGO_WS_", "") if name == "DJANGO_WS_PREFIX" else name):
        Config.from_env({"DJANGO_WS_SECRET": "s" * 16 + "0123456789abcdef" * 2, name: value})
