"""GuardCache bookkeeping without a server: freshness, races with invalidations,
resets, eviction. The subscription itself is tested against a real redis-server
in tests/integration/test_guard_cache_redis.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from proxy.billing.guard_cache import GuardCache

KEYS = ("p:credit:blocked:1", "p:credit:snapshot:1")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Reads:
    """A stand-in for MGET whose replies the test releases by hand."""

    def __init__(self, values: list[Any]) -> None:
        self.values = values
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, keys: Sequence[str]) -> list[Any]:
        self.calls += 1
        await self.gate.wait()
        return list(self.values)


def live_cache(clock: Clock, *, max_entries: int = 100, lookups: list[bool] | None = None):  # type: ignore[no-untyped-def]
    cache = GuardCache(
        None,  # type: ignore[arg-type]  # the subscription is not started here
        ("p:credit:",),
        max_age_s=1.0,
        max_entries=max_entries,
        clock=clock,
        on_lookup=None if lookups is None else lookups.append,
    )
    cache._set_live(True)
    return cache


async def test_read_through_then_hit_until_max_age() -> None:
    clock, lookups = Clock(), []
    cache = live_cache(clock, lookups=lookups)
    reads = Reads([None, b"snap"])
    assert cache.lookup(KEYS) is None
    assert await cache.read_through(KEYS, reads) == [None, b"snap"]
    assert cache.lookup(KEYS) == [None, b"snap"]
    clock.now += 0.99
    assert cache.lookup(KEYS) == [None, b"snap"]
    clock.now += 0.02
    assert cache.lookup(KEYS) is None  # older than max_age: read again
    assert lookups == [False, True, True, False]
    assert reads.calls == 1


async def test_invalidation_drops_entry() -> None:
    cache = live_cache(Clock())
    await cache.read_through(KEYS, Reads([None, b"snap"]))
    cache.invalidate([KEYS[0].encode()])
    assert cache.lookup(KEYS) is None
    assert cache.lookup(KEYS[1:]) == [b"snap"]  # the other key is untouched


async def test_invalidation_during_read_keeps_reply_out() -> None:
    cache = live_cache(Clock())
    reads = Reads([None, b"old"])
    reads.gate.clear()
    task = asyncio.create_task(cache.read_through(KEYS, reads))
    await asyncio.sleep(0)
    cache.invalidate([KEYS[1].encode()])  # the reply may predate this change
    reads.gate.set()
    assert await task == [None, b"old"]  # the caller still gets its answer
    assert cache.lookup(KEYS[1:]) is None
    assert cache.lookup(KEYS[:1]) == [None]  # not invalidated: kept
    # Once no read is in flight, the key is cacheable again.
    await cache.read_through(KEYS, Reads([None, b"new"]))
    assert cache.lookup(KEYS) == [None, b"new"]


async def test_overlapping_reads_and_invalidation() -> None:
    cache = live_cache(Clock())
    first, second = Reads([None, b"a"]), Reads([None, b"b"])
    first.gate.clear()
    second.gate.clear()
    t1 = asyncio.create_task(cache.read_through(KEYS, first))
    await asyncio.sleep(0)
    cache.invalidate([KEYS[1]])
    t2 = asyncio.create_task(cache.read_through(KEYS, second))
    await asyncio.sleep(0)
    first.gate.set()
    await t1
    assert cache.lookup(KEYS) is None
    second.gate.set()
    await t2
    # The second read started after the invalidation but overlapped one that did
    # not: conservatively not kept either.
    assert cache.lookup(KEYS) is None


async def test_reset_during_read_keeps_reply_out() -> None:
    cache = live_cache(Clock())
    reads = Reads([None, b"snap"])
    reads.gate.clear()
    task = asyncio.create_task(cache.read_through(KEYS, reads))
    await asyncio.sleep(0)
    cache._set_live(False)  # the subscription dropped: invalidations may be lost
    cache._set_live(True)
    reads.gate.set()
    await task
    assert cache.lookup(KEYS) is None


async def test_flush_all_message_clears_everything() -> None:
    cache = live_cache(Clock())
    await cache.read_through(KEYS, Reads([b"x", b"y"]))
    cache.invalidate(None)
    assert cache.lookup(KEYS) is None


async def test_not_live_means_no_hits_and_no_stores() -> None:
    cache = live_cache(Clock())
    await cache.read_through(KEYS, Reads([None, b"snap"]))
    cache._set_live(False)
    assert cache.lookup(KEYS) is None
    reads = Reads([None, b"snap"])
    assert await cache.read_through(KEYS, reads) == [None, b"snap"]
    cache.live = True  # flip the flag only: nothing may have been stored meanwhile
    assert cache.lookup(KEYS) is None


async def test_failed_read_leaves_no_pending_state() -> None:
    cache = live_cache(Clock())

    async def boom(keys: Sequence[str]) -> list[Any]:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await cache.read_through(KEYS, boom)
    assert cache._pending == {}
    await cache.read_through(KEYS, Reads([None, b"snap"]))
    assert cache.lookup(KEYS) == [None, b"snap"]


async def test_oldest_entries_evicted_at_capacity() -> None:
    cache = live_cache(Clock(), max_entries=3)
    for i in range(5):
        await cache.read_through((f"k{i}",), Reads([str(i).encode()]))
    assert [cache.lookup((f"k{i}",)) for i in range(5)] == [None, None, [b"2"], [b"3"], [b"4"]]


async def test_restored_entry_moves_to_the_back_of_the_eviction_queue() -> None:
    clock = Clock()
    cache = live_cache(clock, max_entries=2)
    await cache.read_through(("a",), Reads([b"1"]))
    await cache.read_through(("b",), Reads([b"2"]))
    clock.now += 2  # both stale now; "a" is read again and stored anew
    await cache.read_through(("a",), Reads([b"3"]))
    await cache.read_through(("c",), Reads([b"4"]))  # evicts "b", the least recently stored
    assert [cache.lookup((k,)) for k in "abc"] == [[b"3"], None, [b"4"]]


def test_garbled_invalidation_key_is_ignored() -> None:
    cache = live_cache(Clock())
    cache.invalidate([b"p:credit:snapshot:\xff"])  # not ours, not text: no error
    assert cache.live
