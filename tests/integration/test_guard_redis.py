"""CreditBalanceGuard and user-key auth against a real redis-server.

The server is the session's (tests/fixtures_redis.py); tests that stop or pause it
skip when REDIS_URL points at a server we do not own. No timing assertions: the
"quickly" cases only assert that the call returns (under a generous wait_for).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from proxy.billing.auth import Authenticator
from proxy.billing.guard import CreditBalanceGuard, GuardDecision
from proxy.billing.payer import BillingContext
from proxy.billing.snapshot_client import SnapshotClient
from proxy.config import AuthConfig, GuardConfig
from proxy.contract.redis_keys import RedisKeys, encode_snapshot
from proxy.contract.redis_keys import key_sha256 as hash_key
from proxy.errors import ApiError
from tests.billing import test_guard as guard_tests
from tests.billing.test_guard import FakeProvider
from tests.fixtures_redis import RedisServer, free_port

# The fake provider and HTTP session fixtures live with the unit tests.
fake_provider = guard_tests.fake_provider
http = guard_tests.http

GENEROUS_S = 5.0  # "returns at all", not a latency claim
USER = 4242


def ctx(user_id: int = USER) -> BillingContext:
    return BillingContext.normalize(user_id=user_id, scene="chat")


async def command_calls(client: aioredis.Redis, command: str) -> int:
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def wait_for_key(client: aioredis.Redis, key: str) -> bytes:
    for _ in range(200):
        value = await client.get(key)
        if value is not None:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"{key} never appeared")


@pytest.fixture
async def make_guard(
    redis_client: aioredis.Redis, redis_prefix: str, http: aiohttp.ClientSession
) -> AsyncIterator[Callable[..., CreditBalanceGuard]]:
    guards: list[CreditBalanceGuard] = []

    def make(
        provider: FakeProvider | None = None,
        *,
        budget_ms: float = 2000,
        coalesce: bool = True,
        provider_timeout_s: float = 2.0,
    ) -> CreditBalanceGuard:
        config = GuardConfig(
            prefix=redis_prefix,
            budget_ms=budget_ms,
            blocked_ttl_s=123,
            snapshot_ttl_s=456,
            provider_timeout_s=provider_timeout_s,
            coalesce=coalesce,
        )
        snap = SnapshotClient(provider.url, provider_timeout_s, http) if provider else None
        guard = CreditBalanceGuard(redis_client, config, snap)
        guards.append(guard)
        return guard

    yield make
    for guard in guards:
        await guard.close()


# -- decisions from what Redis holds ------------------------------------------------------


async def test_blocked_key_blocks(make_guard, redis_client, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    guard = make_guard()
    await redis_client.set(RedisKeys(redis_prefix).blocked(USER), b"ledger")
    await redis_client.set(RedisKeys(redis_prefix).snapshot(USER), encode_snapshot(1000))
    assert await guard.check(ctx()) is GuardDecision.BLOCK


async def test_positive_snapshot_allows(make_guard, redis_client, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    guard = make_guard()
    await redis_client.set(RedisKeys(redis_prefix).snapshot(USER), encode_snapshot(1))
    assert await guard.check(ctx()) is GuardDecision.ALLOW
    assert await redis_client.exists(RedisKeys(redis_prefix).blocked(USER)) == 0


@pytest.mark.parametrize("credit", [0, -50])
async def test_exhausted_snapshot_blocks_and_sets_marker(  # type: ignore[no-untyped-def]
    make_guard, redis_client, redis_prefix, credit
) -> None:
    guard = make_guard()
    await redis_client.set(RedisKeys(redis_prefix).snapshot(USER), encode_snapshot(credit))
    assert await guard.check(ctx()) is GuardDecision.BLOCK
    ttl = await redis_client.ttl(RedisKeys(redis_prefix).blocked(USER))
    assert 0 < ttl <= 123


async def test_missing_snapshot_without_provider_allows(make_guard) -> None:  # type: ignore[no-untyped-def]
    assert await make_guard().check(ctx()) is GuardDecision.ALLOW


# -- snapshot provider fallback -------------------------------------------------------------


async def test_missing_snapshot_fetched_once_and_backfilled(  # type: ignore[no-untyped-def]
    make_guard, fake_provider, redis_client, redis_prefix
) -> None:
    fake_provider.set(USER, 700)
    fake_provider.delay_s = 0.05  # keep the fetch in flight while the others arrive
    guard = make_guard(fake_provider)
    decisions = await asyncio.gather(*(guard.check(ctx()) for _ in range(10)))
    assert decisions == [GuardDecision.ALLOW] * 10
    assert fake_provider.calls == {USER: 1}
    raw = await redis_client.get(RedisKeys(redis_prefix).snapshot(USER))
    assert orjson.loads(raw)["available_credit"] == 700
    assert 0 < await redis_client.ttl(RedisKeys(redis_prefix).snapshot(USER)) <= 456
    # The next check is served from the back-filled snapshot.
    assert await guard.check(ctx()) is GuardDecision.ALLOW
    assert fake_provider.calls == {USER: 1}


@pytest.mark.parametrize(("balance", "is_blocked"), [(500, True), (0, False), (-3, False)])
async def test_provider_says_no_credit_sets_blocked_key(  # type: ignore[no-untyped-def]
    make_guard, fake_provider, redis_client, redis_prefix, balance, is_blocked
) -> None:
    fake_provider.set(USER, balance, is_blocked)
    guard = make_guard(fake_provider)
    assert await guard.check(ctx()) is GuardDecision.BLOCK
    assert 0 < await redis_client.ttl(RedisKeys(redis_prefix).blocked(USER)) <= 123
    assert await guard.check(ctx()) is GuardDecision.BLOCK
    assert fake_provider.total_calls == 1


async def test_provider_says_credit_clears_stale_blocked_key(  # type: ignore[no-untyped-def]
    make_guard, fake_provider, redis_client, redis_prefix
) -> None:
    # A blocked marker with no snapshot (e.g. snapshot expired first) is still honoured ...
    await redis_client.set(RedisKeys(redis_prefix).blocked(USER), b"x", ex=60)
    fake_provider.set(USER, 10)
    guard = make_guard(fake_provider)
    assert await guard.check(ctx()) is GuardDecision.BLOCK
    assert fake_provider.total_calls == 0
    # ... and once it expires, the provider's good answer allows and leaves no marker.
    await redis_client.delete(RedisKeys(redis_prefix).blocked(USER))
    assert await guard.check(ctx()) is GuardDecision.ALLOW
    assert await redis_client.exists(RedisKeys(redis_prefix).blocked(USER)) == 0


async def test_malformed_snapshot_is_refetched_and_repaired(  # type: ignore[no-untyped-def]
    make_guard, fake_provider, redis_client, redis_prefix
) -> None:
    await redis_client.set(RedisKeys(redis_prefix).snapshot(USER), b"{broken")
    fake_provider.set(USER, 0)
    guard = make_guard(fake_provider)
    assert await guard.check(ctx()) is GuardDecision.BLOCK
    raw = await redis_client.get(RedisKeys(redis_prefix).snapshot(USER))
    assert orjson.loads(raw)["available_credit"] == 0


async def test_backfill_does_not_overwrite_fresher_snapshot(  # type: ignore[no-untyped-def]
    make_guard, fake_provider, redis_client, redis_prefix
) -> None:
    fake_provider.set(USER, 0)  # stale provider view: no credit
    fake_provider.delay_s = 0.2
    guard = make_guard(fake_provider)
    check = asyncio.create_task(guard.check(ctx()))
    await asyncio.wait_for(fake_provider.called.wait(), GENEROUS_S)
    # The billing side writes a fresh snapshot while the provider is answering.
    await redis_client.set(RedisKeys(redis_prefix).snapshot(USER), encode_snapshot(99))
    assert await check is GuardDecision.BLOCK  # this request goes by the provider's word
    raw = await redis_client.get(RedisKeys(redis_prefix).snapshot(USER))
    assert orjson.loads(raw)["available_credit"] == 99
    assert await redis_client.exists(RedisKeys(redis_prefix).blocked(USER)) == 0


async def test_provider_down_fails_open(make_guard, fake_provider) -> None:  # type: ignore[no-untyped-def]
    fake_provider.answers[USER] = (500, b"oops")
    assert await make_guard(fake_provider).check(ctx()) is GuardDecision.FAIL_OPEN


async def test_slow_provider_fails_open_but_still_backfills(  # type: ignore[no-untyped-def]
    make_guard, fake_provider, redis_client, redis_prefix
) -> None:
    fake_provider.set(USER, 0)
    # The provider answers only once the check has given up; the budget only has to
    # cover the MGET that precedes the fetch (a tight one flaked on a loaded CI box).
    gate = fake_provider.gate = asyncio.Event()
    guard = make_guard(fake_provider, budget_ms=500)
    try:
        assert await guard.check(ctx()) is GuardDecision.FAIL_OPEN
        assert fake_provider.total_calls == 1  # failed open while the fetch was in flight
    finally:
        gate.set()  # never leave the fake's handler waiting (its server's teardown would)
    await wait_for_key(redis_client, RedisKeys(redis_prefix).blocked(USER))
    assert await guard.check(ctx()) is GuardDecision.BLOCK
    assert fake_provider.total_calls == 1


async def test_caller_cancellation_does_not_cancel_fetch(  # type: ignore[no-untyped-def]
    make_guard, fake_provider, redis_client, redis_prefix
) -> None:
    fake_provider.set(USER, 5)
    fake_provider.delay_s = 0.1
    guard = make_guard(fake_provider)
    task = asyncio.create_task(guard.check(ctx()))
    await asyncio.wait_for(fake_provider.called.wait(), GENEROUS_S)
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task
    raw = await wait_for_key(redis_client, RedisKeys(redis_prefix).snapshot(USER))
    assert orjson.loads(raw)["available_credit"] == 5


# -- coalescing ---------------------------------------------------------------------------


@pytest.mark.parametrize(("coalesce", "expected_mgets"), [(True, 1), (False, 50)])
async def test_concurrent_checks_share_one_mget(  # type: ignore[no-untyped-def]
    make_guard, redis_client, redis_prefix, coalesce, expected_mgets
) -> None:
    users = range(1, 51)
    for user in users:
        await redis_client.set(RedisKeys(redis_prefix).snapshot(user), encode_snapshot(user % 3))
    guard = make_guard(coalesce=coalesce)
    before = await command_calls(redis_client, "mget")
    decisions = await asyncio.gather(*(guard.check(ctx(u)) for u in users))
    after = await command_calls(redis_client, "mget")
    assert after - before == expected_mgets
    expected = [GuardDecision.ALLOW if u % 3 else GuardDecision.BLOCK for u in users]
    assert decisions == expected


async def test_followers_still_answered_when_leader_is_cancelled(  # type: ignore[no-untyped-def]
    make_guard, redis_server: RedisServer, redis_client, redis_prefix
) -> None:
    await redis_client.set(RedisKeys(redis_prefix).snapshot(1), encode_snapshot(5))
    await redis_client.set(RedisKeys(redis_prefix).snapshot(2), encode_snapshot(0))
    guard = make_guard(budget_ms=3000)
    redis_server.pause()  # hold the shared MGET in flight
    try:
        tasks = [asyncio.create_task(guard.check(ctx(u))) for u in (1, 1, 2)]
        await asyncio.sleep(0.1)
        tasks[0].cancel()  # the first caller of the tick sent the read for all three
    finally:
        redis_server.resume()
    decisions = await asyncio.wait_for(asyncio.gather(*tasks[1:]), GENEROUS_S)
    assert decisions == [GuardDecision.ALLOW, GuardDecision.BLOCK]
    assert tasks[0].cancelled()


async def test_followers_answered_when_leader_is_cancelled_before_sending(  # type: ignore[no-untyped-def]
    make_guard, redis_client, redis_prefix
) -> None:
    await redis_client.set(RedisKeys(redis_prefix).blocked(2), b"ledger")
    guard = make_guard(budget_ms=3000)
    leader = asyncio.create_task(guard.check(ctx(1)))
    follower = asyncio.create_task(guard.check(ctx(2)))
    await asyncio.sleep(0)  # both ran their first step: the leader now yields to let joiners in
    leader.cancel()  # lands before the shared MGET was sent
    # Not a fail-open after the whole budget: the follower gets a read of its own.
    assert await asyncio.wait_for(follower, 1.0) is GuardDecision.BLOCK
    with pytest.raises(asyncio.CancelledError):
        await leader


# -- Redis outages (the guard fails open and recovers; auth fails closed) -------------------


async def test_redis_unreachable_fails_open() -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)
    guard = CreditBalanceGuard(dead, GuardConfig(budget_ms=200))
    try:
        decision = await asyncio.wait_for(guard.check(ctx()), GENEROUS_S)
        assert decision is GuardDecision.FAIL_OPEN
    finally:
        await guard.close()
        await dead.aclose()


@pytest.mark.parametrize("coalesce", [True, False])
async def test_redis_stopped_then_restarted(  # type: ignore[no-untyped-def]
    make_guard, redis_server: RedisServer, redis_client, redis_prefix, coalesce
) -> None:
    guard = make_guard(budget_ms=1000, coalesce=coalesce)
    await redis_client.set(RedisKeys(redis_prefix).snapshot(USER), encode_snapshot(0))
    assert await guard.check(ctx()) is GuardDecision.BLOCK
    redis_server.stop()
    try:
        decision = await asyncio.wait_for(guard.check(ctx()), GENEROUS_S)
        assert decision is GuardDecision.FAIL_OPEN
    finally:
        redis_server.start()  # same port; the data is gone (no persistence)
    # Same guard, same client: the pool reconnects by itself.
    assert await guard.check(ctx()) is GuardDecision.ALLOW
    await redis_client.set(RedisKeys(redis_prefix).blocked(USER), b"ledger")
    assert await guard.check(ctx()) is GuardDecision.BLOCK


@pytest.mark.parametrize("coalesce", [True, False])
async def test_redis_paused_fails_open_within_budget(  # type: ignore[no-untyped-def]
    make_guard, redis_server: RedisServer, redis_client, redis_prefix, coalesce
) -> None:
    # Generous: the checks before the pause must decide within it on a loaded box.
    guard = make_guard(budget_ms=1000, coalesce=coalesce)
    await redis_client.set(RedisKeys(redis_prefix).blocked(USER), b"ledger")
    assert await guard.check(ctx()) is GuardDecision.BLOCK
    redis_server.pause()
    try:
        decisions = await asyncio.wait_for(
            asyncio.gather(*(guard.check(ctx()) for _ in range(5))), GENEROUS_S
        )
        assert decisions == [GuardDecision.FAIL_OPEN] * 5
    finally:
        redis_server.resume()
    assert await guard.check(ctx()) is GuardDecision.BLOCK


async def test_auth_user_key_survives_outage_only_while_cached(  # type: ignore[no-untyped-def]
    redis_server: RedisServer, redis_client, redis_prefix
) -> None:
    key, other = "sk-user-cached", "sk-user-uncached"
    await redis_client.set(f"{redis_prefix}apikey:{hash_key(key)}", b"77")
    await redis_client.set(f"{redis_prefix}apikey:{hash_key(other)}", b"78")
    auth = Authenticator(AuthConfig(redis_timeout_s=0.3), redis_client, redis_prefix)
    assert (await auth.authenticate({"Authorization": f"Bearer {key}"})).user_id == 77
    redis_server.stop()
    try:
        assert (await auth.authenticate({"Authorization": f"Bearer {key}"})).user_id == 77
        with pytest.raises(ApiError) as info:
            await auth.authenticate({"Authorization": f"Bearer {other}"})
        assert (info.value.status, info.value.code) == (503, "auth_unavailable")
    finally:
        redis_server.start()


async def test_auth_paused_redis_answers_503(  # type: ignore[no-untyped-def]
    redis_server: RedisServer, redis_client, redis_prefix
) -> None:
    auth = Authenticator(AuthConfig(redis_timeout_s=0.2), redis_client, redis_prefix)
    await redis_client.ping()
    redis_server.pause()
    try:
        with pytest.raises(ApiError) as info:
            await asyncio.wait_for(
                auth.authenticate({"Authorization": "Bearer sk-whatever"}), GENEROUS_S
            )
        assert info.value.status == 503
    finally:
        redis_server.resume()


# -- snapshots read strictly and conservatively (issue 16) -------------------------------


@pytest.mark.parametrize(
    ("raw", "decision"),
    [
        (b'{"available_credit": -5.0}', GuardDecision.BLOCK),
        (b'{"available_credit": "-5"}', GuardDecision.BLOCK),
        (b'{"available_credit": "0"}', GuardDecision.BLOCK),
        (b'{"available_credit": -0.5}', GuardDecision.BLOCK),
        (b'{"available_credit": "12"}', GuardDecision.ALLOW),
        (b'{"available_credit": 0.5}', GuardDecision.ALLOW),
    ],
)
async def test_numeric_snapshots_decide_by_value(  # type: ignore[no-untyped-def]
    make_guard, redis_client, redis_prefix, raw, decision
) -> None:
    keys = RedisKeys(redis_prefix)
    await redis_client.set(keys.snapshot(USER), raw)
    assert await make_guard().check(ctx()) is decision
    # A block by value leaves the marker, like any snapshot without credit.
    assert await redis_client.exists(keys.blocked(USER)) == (decision is GuardDecision.BLOCK)


@pytest.mark.parametrize(
    "raw", [b"{broken", b'{"available_credit": true}', b'{"available_credit": "lots"}', b"[]"]
)
async def test_unreadable_snapshot_asks_the_provider(  # type: ignore[no-untyped-def]
    make_guard, fake_provider, redis_client, redis_prefix, raw
) -> None:
    await redis_client.set(RedisKeys(redis_prefix).snapshot(USER), raw)
    fake_provider.set(USER, -3)
    assert await make_guard(fake_provider).check(ctx()) is GuardDecision.BLOCK
    assert fake_provider.calls == {USER: 1}


async def test_unreadable_snapshot_without_provider_is_never_allow(  # type: ignore[no-untyped-def]
    make_guard, redis_client, redis_prefix
) -> None:
    await redis_client.set(RedisKeys(redis_prefix).snapshot(USER), b'{"available_credit": true}')
    assert await make_guard().check(ctx()) is GuardDecision.FAIL_OPEN
    # Truly missing, with nobody to ask, is the seed rule's allow.
    assert await make_guard().check(ctx(USER + 1)) is GuardDecision.ALLOW
