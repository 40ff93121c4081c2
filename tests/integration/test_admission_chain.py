"""The reservation and the rate limiter's admission as one script call (guard.mode:
reserve with limits on), against a real redis-server and the 3-node Redis Cluster:
both decisions as when made one after the other, the tokens admitted on the request
as sent, a refused request's hold released, a caller that left given back its slot."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.billing.guard import CreditBalanceGuard
from proxy.billing.hold import Hold, Reserved
from proxy.billing.limits import ALLOW, RateLimiter
from proxy.billing.payer import BillingContext
from proxy.billing.reservations import RedisReservations
from proxy.billing.script_batcher import ScriptBus
from proxy.config import GuardConfig
from proxy.config.model import LimitsConfig, LimitSet
from proxy.contract.redis_keys import RedisKeys
from tests.fixtures_proxy import StartProxy
from tests.fixtures_redis import RedisServer, fund
from tests.integration.test_observability import scrape, value
from tests.integration.test_reservations import (
    REQ,
    THRIFTY,
    estimate_of,
    holds,
    reserving_proxy,
)

pytestmark = pytest.mark.asyncio

TPM = 100_000
LIMITS = (
    f"\nlimits:\n  user: {{rpm: 2, tpm: {TPM}}}\n  key: {{concurrency: 8}}\n  budget_ms: 5000\n"
)


async def settled(h: Any) -> None:
    """The background settle and finish calls are done."""
    assert h.state.limiter is not None
    for _ in range(500):
        if not h.state.limiter.pending:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("scripts still pending")


async def test_one_script_call_admits_both_and_a_limited_requests_hold_is_released(
    start_proxy: StartProxy, redis_target: tuple[str, bool, str], target_client: Any
) -> None:
    h = await reserving_proxy(start_proxy, redis_target, extra_yaml=LIMITS)
    prefix = redis_target[2]
    user = 51
    await fund(target_client, prefix, user)
    est = estimate_of(h, REQ)
    seen: list[tuple[int, Any]] = []
    for _ in range(3):
        status, _, headers = await h.chat(REQ, h.headers(user_id=user))
        seen.append((status, headers))
        await settled(h)
    assert [s for s, _ in seen] == [200, 200, 429]
    # The admission counted the request's estimate (prompt bound + max_tokens), as
    # the limits step alone does: the first request found a full bucket.
    first = seen[0][1]
    assert int(first["x-ratelimit-remaining-tokens"]) == TPM - est.prompt_tokens - est.output_tokens
    assert first["x-ratelimit-remaining-requests"] == "1"
    limited = seen[2][1]
    assert limited["x-ratelimit-remaining-requests"] == "0" and int(limited["Retry-After"]) >= 1
    # The two served requests' holds wait for the ledger; the refused one's is gone.
    left = await holds(target_client, prefix, user)
    assert set(left) == {seen[0][1]["X-Request-Id"], seen[1][1]["X-Request-Id"]}
    got = await scrape(h)
    assert value(got, "llm_proxy_reservations_total", result="admitted") == 3
    assert value(got, "llm_proxy_rate_limit_decisions_total", result="allow") == 2
    assert value(got, "llm_proxy_rate_limit_decisions_total", result="limited") == 1


async def test_a_request_is_two_script_commands_on_one_node(
    start_proxy: StartProxy, redis_server: RedisServer, redis_client: Any, redis_prefix: str
) -> None:
    """Reservation and admission in one command, settle and finish in another
    (before: three, the admission waiting for the reservation's reply)."""
    h = await reserving_proxy(
        start_proxy, (redis_server.url, False, redis_prefix), extra_yaml=LIMITS
    )
    await fund(redis_client, redis_prefix, 52)
    status, _, _ = await h.chat(REQ, h.headers(user_id=52))  # scripts loaded, caches warm
    assert status == 200
    await settled(h)

    async def scripts_run() -> int:
        stats = await redis_client.info("commandstats")
        return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))

    before = await scripts_run()
    status, _, _ = await h.chat(REQ, h.headers(user_id=52))
    await settled(h)
    assert status == 200
    assert await scripts_run() - before == 2


async def test_a_clamped_request_is_admitted_on_its_lowered_output_limit(
    start_proxy: StartProxy, redis_target: tuple[str, bool, str], target_client: Any
) -> None:
    """Clamping changes the request after the reservation: its admission is then
    made on its own, with the tokens of the request as sent."""
    h = await reserving_proxy(
        start_proxy,
        redis_target,
        extra_yaml=LIMITS,
        extra_aliases=THRIFTY,
    )
    body = {**REQ, "model": "thrifty", "max_tokens": 1000}
    est = estimate_of(h, body)
    user = 53
    await fund(target_client, redis_target[2], user, credit=est.credits - (1000 - 40) * 10)
    status, _, headers = await h.chat(body, h.headers(user_id=user))
    assert status == 200
    assert h.recorder.requests[-1]["body"]["max_tokens"] == 40
    assert int(headers["x-ratelimit-remaining-tokens"]) == TPM - est.prompt_tokens - 40
    await settled(h)
    got = await scrape(h)
    assert value(got, "llm_proxy_reservations_total", result="clamped") == 1
    assert value(got, "llm_proxy_rate_limit_decisions_total", result="allow") == 1


async def test_a_refused_reservation_runs_no_admission(
    start_proxy: StartProxy, redis_target: tuple[str, bool, str], target_client: Any
) -> None:
    h = await reserving_proxy(start_proxy, redis_target, extra_yaml=LIMITS)
    user = 54
    await fund(target_client, redis_target[2], user, credit=1)
    for _ in range(3):  # over the rpm limit if any admission ran
        status, _, headers = await h.chat(REQ, h.headers(user_id=user))
        assert status == 402 and "x-ratelimit-remaining-requests" not in headers
    await fund(target_client, redis_target[2], user)
    status, _, headers = await h.chat(REQ, h.headers(user_id=user))
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "1"
    got = await scrape(h)
    assert value(got, "llm_proxy_rate_limit_decisions_total", result="allow") == 1


async def test_a_chained_admission_whose_caller_left_gives_its_slot_back(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    bus = ScriptBus(redis_client)
    guard_config = GuardConfig(prefix=redis_prefix, local_cache=False, budget_ms=5000)
    reservations = RedisReservations(
        CreditBalanceGuard(redis_client, guard_config), guard_config, bus=bus
    )
    limits = LimitsConfig(user=LimitSet(concurrency=1), budget_ms=5000, enabled=True)
    limiter = RateLimiter(redis_client, limits, redis_prefix, bus=bus)
    assert reservations.chain(limiter.admit_script)
    user = 55
    await fund(redis_client, redis_prefix, user)
    ctx = BillingContext.normalize(user_id=user, scene="chat", principal="svc")
    slots = RedisKeys(redis_prefix).limit(user, "user", "conc")
    try:
        # A caller that leaves while its reservation and admission are in flight.
        hold = Hold(user, "left")
        task = asyncio.ensure_future(
            reservations.reserve(hold, 10, 0, limiter.admit_call(ctx, 5, "left"))
        )
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not bus.pending and not await redis_client.zcard(slots):
                break
            await asyncio.sleep(0.01)
        assert await redis_client.zcard(slots) == 0  # the orphan's admission given back
        reservations.settle(hold, 0)  # as the request's end does
        # The only slot is free: the next request is admitted, in one call with its hold.
        hold = Hold(user, "next")
        r = await reservations.reserve(hold, 10, 0, then := limiter.admit_call(ctx, 5, "next"))
        assert r.result is Reserved.ADMITTED and r.then_reply is not None
        assert limiter.decide(then, 5, r.then_reply).result == ALLOW
        assert await redis_client.zrange(slots, 0, -1) == [b"next"]
    finally:
        await limiter.close()
        await reservations.close()
        await bus.close(1.0)
