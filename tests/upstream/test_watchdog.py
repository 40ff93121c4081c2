"""Watchdog: which bound fires (first byte, idle, total), re-arming, and telling our
own timeout from a client's cancellation. Timeouts are short; only *which* bound
fired is asserted, never how fast."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from proxy.config.model import Timeouts
from proxy.upstream.watchdog import Watchdog

# An upper bound on any wait below: far above every timeout used, never reached
# unless the behaviour under test is broken.
BOUND = 5.0


async def guarded(
    timeouts: Timeouts, work: Callable[[Watchdog], Awaitable[None]]
) -> tuple[str | None, bool, bool]:
    """Run `work` under a Watchdog in its own task.

    Returns (wd.expired, cancelled, absorbed): whether `work` was cancelled and, if
    so, whether `absorb()` claimed the cancellation as the Watchdog's own."""

    async def task() -> tuple[str | None, bool, bool]:
        wd = Watchdog(timeouts)
        try:
            await work(wd)
        except asyncio.CancelledError:
            absorbed = wd.absorb()
            if not absorbed:
                raise
            return wd.expired, True, True
        finally:
            wd.cancel()
        return wd.expired, False, False

    return await asyncio.wait_for(asyncio.create_task(task()), BOUND * 2)


async def stall(wd: Watchdog) -> None:
    await asyncio.sleep(BOUND)


async def test_first_byte_bound_fires_while_waiting_for_the_first_byte() -> None:
    expired, cancelled, absorbed = await guarded(
        Timeouts(first_byte=0.05, idle=10.0, total=20.0), stall
    )
    assert (expired, cancelled, absorbed) == ("first byte", True, True)


async def test_first_byte_rearms_when_idle_is_shorter_than_first_byte() -> None:
    # Without the re-arm the timer would still point at the 30 s first-byte deadline
    # and the stall right after the first chunk would outlive BOUND unnoticed.
    async def first_chunk_then_stall(wd: Watchdog) -> None:
        wd.first_byte()
        await asyncio.sleep(BOUND)

    expired, cancelled, _ = await guarded(
        Timeouts(first_byte=30.0, idle=0.05, total=60.0), first_chunk_then_stall
    )
    assert (expired, cancelled) == ("idle", True)


async def test_idle_bound_applies_after_first_byte_when_idle_is_longer() -> None:
    async def first_chunk_then_stall(wd: Watchdog) -> None:
        await asyncio.sleep(0.01)
        wd.first_byte()
        await asyncio.sleep(BOUND)

    # The timer armed for the first byte fires first, finds a chunk came, and re-arms
    # for the idle bound.
    expired, cancelled, _ = await guarded(
        Timeouts(first_byte=0.3, idle=0.6, total=60.0), first_chunk_then_stall
    )
    assert (expired, cancelled) == ("idle", True)


async def test_touch_keeps_a_steady_stream_alive_past_the_idle_bound() -> None:
    async def steady(wd: Watchdog) -> None:
        wd.first_byte()
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0  # two and a half idle periods
        while loop.time() < end:
            await asyncio.sleep(0.01)
            wd.touch()

    expired, cancelled, _ = await guarded(Timeouts(first_byte=0.4, idle=0.4, total=30.0), steady)
    assert (expired, cancelled) == (None, False)


async def test_total_bound_fires_even_while_chunks_keep_arriving() -> None:
    async def endless(wd: Watchdog) -> None:
        wd.first_byte()
        for _ in range(int(BOUND / 0.01)):
            await asyncio.sleep(0.01)
            wd.touch()

    expired, cancelled, _ = await guarded(Timeouts(first_byte=1.0, idle=1.0, total=0.2), endless)
    assert (expired, cancelled) == ("total", True)


async def test_total_shorter_than_first_byte_is_reported_as_total() -> None:
    expired, cancelled, _ = await guarded(Timeouts(first_byte=10.0, idle=10.0, total=0.05), stall)
    assert (expired, cancelled) == ("total", True)


async def test_cancel_disarms_the_timer() -> None:
    async def cancel_then_wait(wd: Watchdog) -> None:
        wd.cancel()
        await asyncio.sleep(0.3)

    expired, cancelled, _ = await guarded(
        Timeouts(first_byte=0.05, idle=0.05, total=0.1), cancel_then_wait
    )
    assert (expired, cancelled) == (None, False)


async def test_cancel_twice_is_harmless() -> None:
    async def cancel_twice(wd: Watchdog) -> None:
        wd.cancel()
        wd.cancel()

    assert await guarded(Timeouts(), cancel_twice) == (None, False, False)


async def test_a_client_cancellation_is_not_absorbed() -> None:
    started = asyncio.Event()
    seen: list[tuple[bool, str | None]] = []

    async def victim() -> None:
        wd = Watchdog(Timeouts(first_byte=10.0, idle=10.0, total=20.0))
        try:
            started.set()
            await asyncio.sleep(BOUND)
        except asyncio.CancelledError:
            seen.append((wd.absorb(), wd.expired))
            raise
        finally:
            wd.cancel()

    task = asyncio.create_task(victim())
    await asyncio.wait_for(started.wait(), BOUND)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [(False, None)]


async def test_absorb_swallows_our_cancellation_so_the_task_can_go_on() -> None:
    async def stall_then_continue() -> str:
        wd = Watchdog(Timeouts(first_byte=0.05, idle=10.0, total=20.0))
        try:
            await asyncio.sleep(BOUND)
        except asyncio.CancelledError:
            assert wd.absorb()
        # Not cancelling any more: further awaits work normally.
        await asyncio.sleep(0)
        current = asyncio.current_task()
        assert current is not None
        return f"cancelling={current.cancelling()}"

    assert await asyncio.wait_for(stall_then_continue(), BOUND * 2) == "cancelling=0"


async def test_watchdog_records_start_and_last_activity() -> None:
    async def work(wd: Watchdog) -> None:
        assert wd.last == wd.started
        await asyncio.sleep(0.01)
        wd.touch()
        assert wd.last > wd.started

    assert await guarded(Timeouts(), work) == (None, False, False)


async def test_first_byte_timeout_is_named_first_byte_when_bounds_are_equal() -> None:
    same = 0.05
    expired, cancelled, _ = await guarded(Timeouts(first_byte=same, idle=same, total=20.0), stall)
    assert (expired, cancelled) == ("first byte", True)
