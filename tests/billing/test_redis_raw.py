"""Pre-packed script calls on a real redis-server: the same replies as redis-py's
own path, error replies raised, a lost script loaded again, a cancelled read not
leaving a half-read connection in the pool."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from proxy.billing import redis_raw
from tests.fixtures_redis import RedisServer

ECHO = "return {KEYS, ARGV, #KEYS, #ARGV}"

args_strategy = st.lists(
    st.one_of(st.text(max_size=20), st.binary(max_size=20), st.integers(-(2**62), 2**62)),
    max_size=8,
)


@given(args=args_strategy)
@settings(max_examples=40, deadline=None)
def test_pack_is_the_resp_array_redis_py_sends(args: list[str | bytes | int]) -> None:
    from redis.asyncio.connection import Connection

    packed = b"".join(Connection().pack_command("EVALSHA", *args))
    assert redis_raw.pack(["EVALSHA", *args]) == packed


async def test_replies_match_redis_py(redis_client: aioredis.Redis) -> None:
    script = redis_client.register_script(ECHO)
    keys, args = ["k:{1}", "k:{1}:b"], ["a", 42, b"\x00\xff", "ünï"]
    assert await redis_raw.evalsha(redis_client, script, keys, args) == await script(
        keys=keys, args=args
    )


async def test_an_error_reply_raises(redis_client: aioredis.Redis) -> None:
    script = redis_client.register_script("return redis.error_reply('boom')")
    with pytest.raises(ResponseError, match="boom"):
        await redis_raw.evalsha(redis_client, script, ["k"], [])


async def test_a_script_the_server_lost_is_loaded_again(
    redis_client: aioredis.Redis,
) -> None:
    script = redis_client.register_script("return 'again: ' .. ARGV[1]")
    await redis_client.script_flush()
    assert await redis_raw.evalsha(redis_client, script, ["k"], ["x"]) == b"again: x"


async def test_a_cancelled_call_does_not_poison_the_pool(
    redis_client: aioredis.Redis,
) -> None:
    slow = redis_client.register_script(
        "local t = redis.call('TIME'); local s = t[1] + t[2] / 1e6;"
        " while true do local n = redis.call('TIME'); if n[1] + n[2] / 1e6 - s > 0.2 then"
        " break end end; return 'slow'"
    )
    await redis_client.script_load(slow.script)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await redis_raw.evalsha(redis_client, slow, ["k"], [])
    fast = redis_client.register_script("return ARGV[1]")
    # The slow reply must not be read as the next call's.
    assert await redis_raw.evalsha(redis_client, fast, ["k"], ["next"]) == b"next"


async def test_a_connection_the_server_dropped_is_replaced(
    redis_client: aioredis.Redis, redis_server: RedisServer
) -> None:
    script = redis_client.register_script("return ARGV[1]")
    assert await redis_raw.evalsha(redis_client, script, ["k"], ["one"]) == b"one"
    pooled = await redis_raw.execute(redis_client, redis_raw.pack(["CLIENT", "ID"]))
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await admin.client_kill_filter(_id=pooled) == 1  # that connection only
    finally:
        await admin.aclose()
    assert await redis_raw.evalsha(redis_client, script, ["k"], ["two"]) == b"two"
