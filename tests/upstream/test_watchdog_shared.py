"""The loop's one shared watchdog timer: requests do not arm timers of their own, a
shorter bound arriving later still fires in time, and many watchdogs each get theirs."""

from __future__ import annotations

import asyncio

import pytest

from proxy.config.model import Timeouts
from proxy.upstream.watchdog import SLACK_S, Watchdog, WatchdogTicker

BOUND = 5.0


async def test_requests_with_later_deadlines_arm_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    armed: list[float] = []
    real = loop.call_at
    monkeypatch.setattr(
        loop, "call_at", lambda when, cb, *a: armed.append(when) or real(when, cb, *a)
    )
    ticker = WatchdogTicker()
    dogs = [Watchdog(Timeouts(first_byte=30.0, idle=30.0, total=60.0), ticker) for _ in range(50)]
    for dog in dogs:
        dog.first_byte()
        dog.touch()
    assert len(armed) <= 1  # the first one (if the loop's timer was idle), no more
    for dog in dogs:
        dog.cancel()
    assert not ticker._dogs


TICKER = WatchdogTicker()  # shared by the watchdogs of each test below, as in a router


async def run_until_expired(timeouts: Timeouts, first_byte_after: float | None) -> str | None:
    async def task() -> str | None:
        wd = Watchdog(timeouts, TICKER)
        try:
            if first_byte_after is not None:
                await asyncio.sleep(first_byte_after)
                wd.first_byte()
            await asyncio.sleep(BOUND)
        except asyncio.CancelledError:
            assert wd.absorb()
            return wd.expired
        finally:
            wd.cancel()
        return None

    return await asyncio.wait_for(asyncio.create_task(task()), BOUND * 2)


async def test_a_short_bound_after_a_long_one_fires_in_time() -> None:
    loop = asyncio.get_running_loop()
    long_one = Watchdog(Timeouts(first_byte=60.0, idle=60.0, total=120.0), TICKER)  # arms ~60 s
    try:
        started = loop.time()
        assert await run_until_expired(Timeouts(first_byte=0.1, idle=1.0, total=9.0), None) == (
            "first byte"
        )
        assert loop.time() - started < 0.1 + 1.0  # not the long one's deadline
    finally:
        long_one.cancel()


async def test_many_watchdogs_each_fire_their_own_bound() -> None:
    cases = [
        (Timeouts(first_byte=0.05, idle=9.0, total=20.0), None, "first byte"),
        (Timeouts(first_byte=9.0, idle=0.1, total=20.0), 0.02, "idle"),
        (Timeouts(first_byte=0.3, idle=0.2, total=20.0), 0.05, "idle"),
        (Timeouts(first_byte=9.0, idle=9.0, total=0.15), 0.01, "total"),
        (Timeouts(first_byte=0.2, idle=0.2, total=0.2), None, "total"),  # a tie: total
        (Timeouts(first_byte=0.1, idle=0.1, total=20.0), None, "first byte"),
    ]
    results = await asyncio.gather(*(run_until_expired(t, fb) for t, fb, _ in cases * 3))
    assert results == [want for _, _, want in cases * 3]


async def test_a_steady_stream_among_stalled_ones_is_left_alone() -> None:
    async def steady() -> str | None:
        wd = Watchdog(Timeouts(first_byte=0.2, idle=0.2, total=20.0), TICKER)
        try:
            wd.first_byte()
            for _ in range(40):
                await asyncio.sleep(0.01)
                wd.touch()
        finally:
            wd.cancel()
        return wd.expired

    stalled = Timeouts(first_byte=0.1, idle=0.1, total=20.0)
    results = await asyncio.gather(steady(), *(run_until_expired(stalled, None) for _ in range(5)))
    assert results == [None] + ["first byte"] * 5


def test_a_late_check_names_the_bound_that_passed_first() -> None:
    async def main() -> None:
        wd = Watchdog(Timeouts(first_byte=0.1, idle=0.1, total=0.12))
        wd.cancel()
        wd._task = None  # name the bound only; do not cancel this test
        wd._expire()  # as if the check ran after both deadlines
        assert wd.expired == "first byte"
        tie = Watchdog(Timeouts(first_byte=0.1, idle=0.1, total=0.1))
        tie.cancel()
        tie._task = None
        tie._expire()
        assert tie.expired == "total"

    asyncio.run(main())


async def test_a_watchdog_without_a_ticker_has_its_own() -> None:
    shared = WatchdogTicker()
    mine = Watchdog(Timeouts(first_byte=9.0, idle=9.0, total=9.0))
    theirs = Watchdog(Timeouts(first_byte=9.0, idle=9.0, total=9.0), shared)
    assert mine._ticker is not shared and shared._dogs == {theirs}
    mine.cancel()
    theirs.cancel()
    assert not shared._dogs
    assert SLACK_S <= 0.1
