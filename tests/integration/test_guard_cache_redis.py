"""The guard's local mirror (proxy/guard_cache.py) against a real redis-server:
hits skip Redis, every kind of change reaches it through Redis' invalidations,
a lost subscription empties it until it is back, and a Redis that refuses client
tracking leaves it off. Waits poll with a deadline; max_age is set far beyond
them, so a change seen in time was seen through an invalidation."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.billing.guard import CreditBalanceGuard, GuardDecision
from proxy.billing.guard_cache import CLIENT_NAME, GuardCache
from proxy.billing.payer import BillingContext
from proxy.config import GuardConfig
from proxy.contract.redis_keys import RedisKeys, encode_snapshot
from tests.fixtures_redis import RedisServer
from tests.integration.test_guard_redis import command_calls

USER = 5151
DEADLINE_S = 3.0


def ctx(user_id: int = USER) -> BillingContext:
    return BillingContext.normalize(user_id=user_id, scene="chat")


async def eventually(predicate: Callable[[], object], what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_S
    while not await _call(predicate):
        if loop.time() > end:
            raise AssertionError(f"not within {DEADLINE_S} s: {what}")
        await asyncio.sleep(0.01)


async def _call(predicate: Callable[[], object]) -> object:
    result = predicate()
    return await result if asyncio.iscoroutine(result) else result


async def decides(guard: CreditBalanceGuard, expected: GuardDecision) -> bool:
    return await guard.check(ctx()) is expected


class Lookups:
    def __init__(self) -> None:
        self.hits = self.misses = 0

    def __call__(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1


@pytest.fixture
async def cached_guard(
    redis_server: RedisServer, redis_prefix: str
) -> AsyncIterator[Callable[..., CreditBalanceGuard]]:
    made: list[tuple[CreditBalanceGuard, aioredis.Redis]] = []

    def make(
        lookups: Lookups | None = None, url: str | None = None, **client_kw: object
    ) -> CreditBalanceGuard:
        client = aioredis.Redis.from_url(url or redis_server.url, socket_timeout=2, **client_kw)
        config = GuardConfig(prefix=redis_prefix, budget_ms=2000, local_cache_max_age_s=3600)
        guard = CreditBalanceGuard(client, config, on_cache_lookup=lookups)
        guard.start()
        made.append((guard, client))
        return guard

    yield make
    for guard, client in made:
        await guard.close()
        await client.aclose()


async def cached(guard: CreditBalanceGuard, lookups: Lookups) -> None:
    """Check until one check is a hit: the invalidation of the test's own setup
    write may arrive while the first read is in flight, and then (by design) that
    read is not kept."""

    async def hit() -> bool:
        before = lookups.hits
        await guard.check(ctx())
        return lookups.hits > before

    await eventually(hit, "a check served from the cache")


async def live(guard: CreditBalanceGuard) -> None:
    assert guard.cache is not None
    await eventually(lambda: guard.cache.live, "the cache's subscription is up")  # type: ignore[union-attr]


async def warm_guard(
    cached_guard: Callable[..., CreditBalanceGuard],
    redis_client: aioredis.Redis,
    prefix: str,
    **client_kw: object,
) -> tuple[CreditBalanceGuard, Lookups]:
    """A live guard whose cache holds USER (credit 100)."""
    lookups = Lookups()
    guard = cached_guard(lookups, **client_kw)
    await live(guard)
    await redis_client.set(RedisKeys(prefix).snapshot(USER), encode_snapshot(100))
    await cached(guard, lookups)
    return guard, lookups


async def sees_block(guard: CreditBalanceGuard, redis_client: aioredis.Redis, prefix: str) -> None:
    await redis_client.set(RedisKeys(prefix).blocked(USER), b"ledger")
    await eventually(lambda: decides(guard, GuardDecision.BLOCK), "block seen")


async def test_hits_decide_without_redis(cached_guard, redis_client, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    lookups = Lookups()
    guard = cached_guard(lookups)
    await live(guard)
    await redis_client.set(RedisKeys(redis_prefix).snapshot(USER), encode_snapshot(100))
    assert await guard.check(ctx()) is GuardDecision.ALLOW
    assert (lookups.hits, lookups.misses) == (0, 1)
    await cached(guard, lookups)
    before_mget, before_hits = await command_calls(redis_client, "mget"), lookups.hits
    for _ in range(20):
        assert await guard.check(ctx()) is GuardDecision.ALLOW
    assert await command_calls(redis_client, "mget") == before_mget
    assert lookups.hits == before_hits + 20


async def test_every_kind_of_change_reaches_the_cache(  # type: ignore[no-untyped-def]
    cached_guard, redis_client, redis_prefix
) -> None:
    guard = cached_guard()
    await live(guard)
    snap, blocked = RedisKeys(redis_prefix).snapshot(USER), RedisKeys(redis_prefix).blocked(USER)
    await redis_client.set(snap, encode_snapshot(100))
    assert await guard.check(ctx()) is GuardDecision.ALLOW
    assert await guard.check(ctx()) is GuardDecision.ALLOW  # from the cache now

    await redis_client.set(blocked, b"ledger")  # the billing side blocks
    await eventually(lambda: decides(guard, GuardDecision.BLOCK), "blocked marker seen")

    await redis_client.delete(blocked)  # a grant lifts it
    await eventually(lambda: decides(guard, GuardDecision.ALLOW), "marker deletion seen")

    await redis_client.set(snap, encode_snapshot(0))  # spent
    await eventually(lambda: decides(guard, GuardDecision.BLOCK), "empty snapshot seen")
    assert await redis_client.exists(blocked) == 1  # the guard set the marker itself

    await redis_client.set(snap, encode_snapshot(10))
    await redis_client.set(blocked, b"x", px=300)  # expires on its own
    await eventually(lambda: decides(guard, GuardDecision.BLOCK), "short marker seen")
    await eventually(lambda: decides(guard, GuardDecision.ALLOW), "marker expiry seen")


async def test_other_users_changes_do_not_evict(  # type: ignore[no-untyped-def]
    cached_guard, redis_client, redis_prefix
) -> None:
    guard, lookups = await warm_guard(cached_guard, redis_client, redis_prefix)
    await redis_client.set(RedisKeys(redis_prefix).snapshot(USER + 1), encode_snapshot(5))
    await redis_client.set(f"{redis_prefix}unrelated", b"1")
    await asyncio.sleep(0.1)  # let any (wrong) invalidation arrive
    before = lookups.hits
    assert await guard.check(ctx()) is GuardDecision.ALLOW
    assert lookups.hits == before + 1


async def _kill_subscription(client: aioredis.Redis) -> int:
    killed = 0
    for entry in await client.client_list():
        if entry.get("name") == CLIENT_NAME:
            await client.client_kill_filter(_id=entry["id"])
            killed += 1
    return killed


async def test_lost_subscription_empties_cache_until_back(  # type: ignore[no-untyped-def]
    cached_guard, redis_client, redis_prefix
) -> None:
    guard = cached_guard()
    await live(guard)
    snap = RedisKeys(redis_prefix).snapshot(USER)
    await redis_client.set(snap, encode_snapshot(100))
    assert await guard.check(ctx()) is GuardDecision.ALLOW
    # Kill the subscription and change the key in the same breath: the
    # invalidation for this change can never arrive on the dead connection.
    pipe = redis_client.pipeline(transaction=False)
    assert await _kill_subscription(redis_client) >= 1
    await pipe.set(snap, encode_snapshot(0)).execute()
    await eventually(lambda: decides(guard, GuardDecision.BLOCK), "change made while down")
    await live(guard)  # reconnected by itself


async def test_redis_restart_resubscribes(  # type: ignore[no-untyped-def]
    cached_guard, redis_server: RedisServer, redis_client, redis_prefix
) -> None:
    if redis_server.external:
        pytest.skip("restarts the server: only with the tests' own redis-server")
    lookups = Lookups()
    guard = cached_guard(lookups)
    await live(guard)
    await redis_client.set(RedisKeys(redis_prefix).snapshot(USER), encode_snapshot(0))
    assert await guard.check(ctx()) is GuardDecision.BLOCK
    redis_server.stop()
    try:
        await eventually(lambda: not guard.cache.live, "cache off while Redis is down")
        assert await guard.check(ctx()) is GuardDecision.FAIL_OPEN  # nothing stale served
    finally:
        redis_server.start()  # same port, no data
    await live(guard)
    assert await guard.check(ctx()) is GuardDecision.ALLOW
    await cached(guard, lookups)  # caching again


class NoTrackingRedis(RedisServer):
    """A redis-server that refuses CLIENT (as some managed services do)."""

    def command(self, workdir: Path) -> list[str]:
        return [*super().command(workdir), "--rename-command", "CLIENT", ""]


async def test_redis_refusing_tracking_leaves_cache_off(cached_guard) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server on PATH")
    server = NoTrackingRedis()
    server.start()
    try:
        lookups = Lookups()
        guard = cached_guard(lookups, url=server.url)
        await eventually(lambda: guard.cache.unsupported, "tracking refused")
        writer = aioredis.Redis.from_url(server.url)
        try:
            await writer.set(RedisKeys(guard._config.prefix).snapshot(USER), encode_snapshot(5))
            assert await guard.check(ctx()) is GuardDecision.ALLOW
            await writer.set(RedisKeys(guard._config.prefix).blocked(USER), b"1")
            assert await guard.check(ctx()) is GuardDecision.BLOCK  # read every time
        finally:
            await writer.aclose()
        assert (lookups.hits, lookups.misses) == (0, 0)
        assert not guard.cache.live
    finally:
        server.close()


async def test_decoding_client_still_gets_invalidations(  # type: ignore[no-untyped-def]
    cached_guard, redis_client, redis_prefix
) -> None:
    """A Redis client made with decode_responses=True (e.g. from REDIS_URL) must not
    turn the invalidation messages into strings the cache does not recognise."""
    guard, _ = await warm_guard(cached_guard, redis_client, redis_prefix, decode_responses=True)
    await sees_block(guard, redis_client, redis_prefix)


async def test_undecodable_key_does_not_end_the_subscription(  # type: ignore[no-untyped-def]
    cached_guard, redis_client, redis_prefix
) -> None:
    guard, lookups = await warm_guard(cached_guard, redis_client, redis_prefix)
    await redis_client.set(RedisKeys(redis_prefix).credit_prefix.encode() + b"\xff\xfe", b"junk")
    await asyncio.sleep(0.05)  # its invalidation arrives
    assert guard.cache is not None and guard.cache.live
    await cached(guard, lookups)  # still caching
    await sees_block(guard, redis_client, redis_prefix)


async def test_busy_server_pauses_the_cache_but_does_not_disable_it(  # type: ignore[no-untyped-def]
    redis_server: RedisServer, redis_client, redis_prefix
) -> None:
    """A long Lua script makes Redis answer BUSY (here to the keep-alive PING): a
    passing condition, so the subscription is re-established afterwards."""
    if redis_server.external:
        pytest.skip("changes busy-reply-threshold: only with the tests' own redis-server")
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=5)
    states: list[bool] = []
    cache = GuardCache(
        client,
        (f"{redis_prefix}credit:",),
        max_age_s=60,
        max_entries=10,
        ping_interval_s=0.05,
        on_live=states.append,
    )
    cache.start()
    before = (await redis_client.config_get("busy-reply-threshold"))["busy-reply-threshold"]
    try:
        await eventually(lambda: cache.live, "subscription up")
        await redis_client.config_set("busy-reply-threshold", 100)
        spin = (
            "local s = redis.call('TIME') local t0 = s[1] * 1e6 + s[2] "
            "repeat local t = redis.call('TIME') until t[1] * 1e6 + t[2] - t0 > 400000 "
            "return 1"
        )
        await redis_client.eval(spin, 0)
        await eventually(lambda: cache.live, "subscription back after the script")
        assert states[:2] == [True, False]  # the BUSY reply did break the link
        assert not cache.unsupported
    finally:
        await redis_client.config_set("busy-reply-threshold", before)
        await cache.aclose()
        await client.aclose()
