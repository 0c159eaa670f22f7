"""Choosing the websocket instance of a hand-over (pure logic: registry, probes and
clock are given)."""

from __future__ import annotations

import random

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from django_ws.handover import DEAD_FOR, PROBE_OK_FOR, REFRESH, Chooser
from uwsgi_ws.ops import Instance, choose_instance, drain_schedule

A, B, C = "/run/a/ws.sock", "/run/b/ws.sock", "/run/c/ws.sock"


def instance(address: str, connections: int, *, ready: bool = True) -> Instance:
    return Instance(address, [{"connections": {"websocket": connections}, "ready": ready}])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_least_loaded_ready_instance_is_chosen():
    picks = [choose_instance([instance(A, 5), instance(B, 2), instance(C, 1, ready=False)])]
    assert [p.address for p in picks if p] == [B]
    assert choose_instance([instance(A, 0, ready=False)]) is None


def test_hand_overs_since_the_last_read_count_as_load():
    clock = Clock()
    chooser = Chooser(lambda: [instance(A, 10), instance(B, 7)], probe=lambda a: True, clock=clock)
    chosen = [chooser.choose((A, B), registry=True) for _ in range(7)]
    # B takes the first three (7, 8, 9 < 10), then they alternate from a tie at 10.
    assert chosen[:3] == [B, B, B]
    assert sorted(chosen[3:]) == [A, A, B, B]


def test_only_listed_addresses_are_used_whatever_the_registry_says():
    chooser = Chooser(lambda: [instance("/tmp/evil.sock", 0), instance(B, 50)], probe=lambda a: True)
    assert {chooser.choose((A, B), registry=True) for _ in range(5)} == {B}


def test_a_refused_address_is_skipped_then_tried_again():
    clock = Clock()
    alive = {A: True, B: True}
    probes: list[str] = []

    def probe(address: str) -> bool:
        probes.append(address)
        return alive[address]

    chooser = Chooser(lambda: [instance(A, 0), instance(B, 5)], probe=probe, clock=clock)
    assert chooser.choose((A, B), registry=True) == A
    alive[A] = False  # killed: its registry entry is still fresh
    clock.now += PROBE_OK_FOR
    assert [chooser.choose((A, B), registry=True) for _ in range(3)] == [B, B, B]
    assert probes.count(A) == 2  # refused once, then skipped
    alive[A] = True
    clock.now += DEAD_FOR + REFRESH
    assert chooser.choose((A, B), registry=True) == A


def test_without_the_registry_the_list_is_used_in_turn_skipping_the_dead():
    def broken() -> list[Instance]:
        raise RedisConnectionError("down")

    chooser = Chooser(broken, probe=lambda a: a != B)
    assert [chooser.choose((A, B, C), registry=True) for _ in range(4)] == [A, C, A, C]
    static = Chooser(broken, probe=lambda a: True)
    assert [static.choose((A, B), registry=False) for _ in range(4)] == [A, B, A, B]


def test_draining_instances_are_not_chosen():
    chooser = Chooser(lambda: [instance(A, 0, ready=False), instance(B, 99)], probe=lambda a: True)
    assert chooser.choose((A, B), registry=True) == B


@pytest.mark.parametrize("count,window", [(1, 5.0), (10, 1.0), (1000, 10.0)])
def test_drain_closes_are_spread_over_the_window_one_per_slot(count, window):
    times = drain_schedule(count, window, random.Random(count))
    assert len(times) == count
    slot = window / count
    assert all(i * slot <= t < (i + 1) * slot for i, t in enumerate(times))
    assert times == sorted(times)
