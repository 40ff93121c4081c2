from __future__ import annotations

import asyncio

import pytest

from proxy.config.model import RoutingPolicy
from proxy.upstream.cooldown import Breaker, Slots

POLICY = RoutingPolicy(allowed_fails=3, window_s=10, cooldown_s=30)


def test_breaker_opens_after_allowed_fails_within_the_window() -> None:
    changes: list[bool] = []
    b = Breaker(changes.append)
    b.failure(0, POLICY)
    b.failure(1, POLICY)
    b.failure(20, POLICY)  # the first two fell out of the window
    assert b.available(20, POLICY) and not changes
    b.failure(21, POLICY)
    b.failure(22, POLICY)
    assert not b.available(23, POLICY) and changes == [True]
    assert b.state(23) == "cooldown"


def test_one_probe_after_the_cooldown_then_closed_or_open_again() -> None:
    changes: list[bool] = []
    b = Breaker(changes.append)
    for t in (0, 1, 2):
        b.failure(t, POLICY)
    assert b.available(33, POLICY)
    b.begin(33)  # the probe
    assert not b.available(33.5, POLICY) and b.state(33.5) == "probing"
    b.failure(34, POLICY)
    assert not b.available(40, POLICY) and b.available(64.5, POLICY)
    b.begin(65)
    b.success()
    assert b.available(65, POLICY) and b.state(65) == "ok" and changes == [True, False]


def test_a_probe_that_never_reports_is_forgotten() -> None:
    b = Breaker(lambda _: None)
    for t in (0, 1, 2):
        b.failure(t, POLICY)
    b.begin(33)
    assert not b.available(40, POLICY) and b.available(64, POLICY)


@pytest.mark.asyncio
async def test_slots_bounded_wait() -> None:
    slots = Slots(1)
    release = await slots.acquire(0)
    assert release is not None and slots.in_use == 1
    assert await slots.acquire(0) is None
    assert await slots.acquire(0.01) is None
    waiter = asyncio.create_task(slots.acquire(5))
    await asyncio.sleep(0)
    release()
    release()  # twice is once
    second = await waiter
    assert second is not None and slots.in_use == 1
    second()
    assert slots.in_use == 0
