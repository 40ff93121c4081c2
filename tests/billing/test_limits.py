"""The rate limiter's scripts against a real redis-server."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from proxy.billing.estimate import prompt_bound
from proxy.billing.limits import (
    ALLOW,
    FAIL_CLOSED,
    FAIL_OPEN,
    LIMITED,
    RateLimiter,
    admission_tokens,
    clear_override,
    format_reset,
    get_override,
    set_override,
)
from proxy.billing.payer import BillingContext
from proxy.billing.record import ChatRequest
from proxy.config.model import LimitsConfig, LimitSet
from proxy.contract.redis_keys import RedisKeys

pytestmark = pytest.mark.asyncio


def ctx(user: int = 7, principal: str = "svc") -> BillingContext:
    return BillingContext(user, "chat", "r", None, False, principal)


def limiter(
    redis: aioredis.Redis, prefix: str, decisions: list[str] | None = None, **kw: object
) -> RateLimiter:
    config = replace(LimitsConfig(enabled=True), **kw)  # type: ignore[arg-type]
    sink = decisions if decisions is not None else []
    return RateLimiter(redis, config, prefix, on_decision=sink.append)


async def test_rpm_admits_exactly_the_limit_then_429_headers(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    decisions: list[str] = []
    lim = limiter(redis_client, redis_prefix, decisions, user=LimitSet(rpm=3))
    got = [await lim.admit(ctx(), 10, f"r{i}") for i in range(5)]
    assert [a.result for a in got] == [ALLOW, ALLOW, ALLOW, LIMITED, LIMITED]
    assert decisions == [ALLOW] * 3 + [LIMITED] * 2
    assert got[0].headers["x-ratelimit-limit-requests"] == "3"
    assert got[0].headers["x-ratelimit-remaining-requests"] == "2"
    assert got[2].headers["x-ratelimit-remaining-requests"] == "0"
    assert got[3].refused == "user rpm" and 1 <= got[3].retry_after_s <= 20
    assert got[3].headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-ratelimit-limit-tokens" not in got[0].headers
    # Another user has a bucket of its own.
    assert (await lim.admit(ctx(8), 10, "x")).result == ALLOW


async def test_tpm_admits_on_the_estimate_and_settle_corrects_it(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    lim = limiter(redis_client, redis_prefix, user=LimitSet(tpm=1000))
    a = await lim.admit(ctx(), 800, "a")
    assert a.result == ALLOW and a.headers["x-ratelimit-remaining-tokens"] == "200"
    assert (await lim.admit(ctx(), 800, "b")).result == LIMITED
    lim.finish(a, 50, "a")  # it used 50: 750 come back
    while lim.pending:
        await asyncio.sleep(0.005)
    b = await lim.admit(ctx(), 800, "b")
    assert b.result == ALLOW and 140 <= int(b.headers["x-ratelimit-remaining-tokens"]) <= 160
    lim.finish(b, 1900, "b")  # it used far more than estimated: owed
    while lim.pending:
        await asyncio.sleep(0.005)
    refused = await lim.admit(ctx(), 10, "c")
    assert refused.result == LIMITED and refused.refused == "user tpm"
    assert refused.retry_after_s >= 50  # ~950 tokens owed at 1000/min


async def test_a_request_bigger_than_the_minute_needs_a_full_bucket(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    lim = limiter(redis_client, redis_prefix, user=LimitSet(tpm=100))
    assert (await lim.admit(ctx(), 5000, "big")).result == ALLOW
    assert (await lim.admit(ctx(), 1, "next")).result == LIMITED


async def test_concurrency_slots_release_and_expire(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    lim = limiter(redis_client, redis_prefix, key=LimitSet(concurrency=1), slot_ttl_s=0.2)
    a = await lim.admit(ctx(), 1, "a")
    assert a.result == ALLOW and a.holds_slot
    refused = await lim.admit(ctx(), 1, "b")
    assert refused.result == LIMITED and refused.refused == "key concurrency"
    assert refused.retry_after_s == 1
    # Another key of the same user has its own slots.
    assert (await lim.admit(ctx(principal="other"), 1, "o")).result == ALLOW
    lim.finish(a, 0, "a")
    while lim.pending:
        await asyncio.sleep(0.005)
    b = await lim.admit(ctx(), 1, "b")
    assert b.result == ALLOW
    # b is never finished (its proxy died): its slot expires.
    await asyncio.sleep(0.3)
    assert (await lim.admit(ctx(), 1, "c")).result == ALLOW


async def test_overrides_replace_the_user_defaults(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    lim = limiter(redis_client, redis_prefix, user=LimitSet(rpm=1))
    assert await set_override(redis_client, redis_prefix, 7, {"rpm": 2}) == {"rpm": 2}
    assert [(await lim.admit(ctx(), 1, str(i))).result for i in range(3)] == [
        ALLOW,
        ALLOW,
        LIMITED,
    ]
    await set_override(redis_client, redis_prefix, 9, {"rpm": -1, "tpm": 5})
    assert await get_override(redis_client, redis_prefix, 9) == {"rpm": -1, "tpm": 5}
    assert all([(await lim.admit(ctx(9), 1, str(i))).result == ALLOW for i in range(4)])
    assert await clear_override(redis_client, redis_prefix, 9)
    assert await get_override(redis_client, redis_prefix, 9) == {}
    # No defaults at all: an override alone limits (limits: section present).
    bare = limiter(redis_client, redis_prefix)
    await set_override(redis_client, redis_prefix, 11, {"rpm": 0})
    assert (await bare.admit(ctx(11), 1, "z")).result == LIMITED
    assert (await bare.admit(ctx(12), 1, "z")).result == ALLOW


async def test_keys_share_the_users_hash_tag(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    lim = limiter(redis_client, redis_prefix)
    tags = {k[k.index("{") : k.index("}") + 1] for k in lim.keys_for(ctx(42))}
    assert tags == {"{42}"}
    assert RedisKeys(redis_prefix).limits_override(42).endswith("limits:{42}:override")


async def test_fail_open_and_closed(redis_prefix: str) -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    try:
        decisions: list[str] = []
        opened = limiter(dead, redis_prefix, decisions, user=LimitSet(rpm=1))
        assert (await opened.admit(ctx(), 1, "a")).result == FAIL_OPEN
        closed = limiter(dead, redis_prefix, decisions, user=LimitSet(rpm=1), fail_open=False)
        assert (await closed.admit(ctx(), 1, "a")).result == FAIL_CLOSED
        assert decisions == [FAIL_OPEN, FAIL_CLOSED]
    finally:
        await dead.aclose()


async def test_admission_tokens_and_reset_format() -> None:
    from proxy.config.model import Alias

    alias = Alias("a", None, "m", None, reserve_output_tokens=300)  # type: ignore[arg-type]
    msgs = [{"role": "user", "content": "x" * 40}]
    chat = ChatRequest(alias, {"messages": msgs, "max_tokens": 100}, False, False)
    # The reservation's estimate: the prompt's byte bound (OpenAI's chat framing +
    # 40 bytes + the role) plus the output allowance.
    prompt = prompt_bound(chat)
    assert prompt >= 40
    assert admission_tokens(chat) == prompt + 100
    assert admission_tokens(replace(chat, body={"messages": msgs})) == prompt + 300
    two = {"messages": msgs, "max_completion_tokens": 7, "n": 2}
    assert admission_tokens(replace(chat, body=two)) == prompt + 14
    # The reservation's prompt bound, when admission computed it, is reused as it is.
    assert admission_tokens(chat, prompt) == admission_tokens(chat) == prompt + 100
    assert [format_reset(ms) for ms in (0, 20, 1000, 1001, 61_000, 3_723_000)] == [
        "0s",
        "20ms",
        "1s",
        "2s",
        "1m1s",
        "1h2m3s",
    ]


async def test_finishes_of_one_tick_share_a_pipeline_and_survive_a_script_flush(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    lim = limiter(redis_client, redis_prefix, user=LimitSet(concurrency=3, tpm=10_000))
    held = [await lim.admit(ctx(), 100, f"r{i}") for i in range(3)]
    assert (await lim.admit(ctx(), 100, "over")).refused == "user concurrency"
    await redis_client.script_flush()  # as after a Redis restart: the script is reloaded
    for i, a in enumerate(held):
        lim.finish(a, 10, f"r{i}")
    assert lim.pending == 3  # three queued for one flush
    while lim.pending:
        await asyncio.sleep(0.005)
    again = await lim.admit(ctx(), 100, "again")
    assert again.result == ALLOW
    assert int(again.headers["x-ratelimit-remaining-tokens"]) >= 10_000 - 30 - 100 - 1


async def test_admits_of_one_tick_share_a_pipeline_and_stay_exact(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    lim = limiter(redis_client, redis_prefix, user=LimitSet(rpm=3))
    got = await asyncio.gather(*(lim.admit(ctx(), 1, f"r{i}") for i in range(8)))
    assert sorted(a.result for a in got) == [ALLOW] * 3 + [LIMITED] * 5


async def test_an_admit_whose_caller_left_gives_back_what_it_took(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    lim = limiter(redis_client, redis_prefix, user=LimitSet(concurrency=1, tpm=1000))
    task = asyncio.create_task(lim.admit(ctx(), 900, "gone"))
    await asyncio.sleep(0)  # queued; the script is sent by the batcher's task
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    while lim.pending:
        await asyncio.sleep(0.005)
    back = await lim.admit(ctx(), 900, "next")
    assert back.result == ALLOW  # the slot and the 900 tokens came back
