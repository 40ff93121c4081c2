"""Pre-packed commands pipelined on one connection, on a real redis-server: the same
replies as redis-py's own path, error replies raised as redis-py's exceptions,
replies matched to their commands in order (also when a caller gave up), a
connection the server dropped replaced, a reset connection not read out of step."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from proxy.billing import redis_raw
from proxy.billing.redis_raw import PipeReset, RedisPipe
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


calls_strategy = st.lists(
    st.tuples(
        st.lists(st.text(max_size=30), min_size=1, max_size=12),
        st.lists(st.one_of(st.text(max_size=40), st.binary(max_size=20)), max_size=4),
    ),
    min_size=1,
    max_size=8,
)


@given(calls=calls_strategy, sha=st.text(alphabet="0123456789abcdef", min_size=40, max_size=40))
@settings(max_examples=60, deadline=None)
def test_evalsha_from_pieces_is_the_flat_command(
    calls: list[tuple[list[str], list[str | bytes]]], sha: str
) -> None:
    # What the bus sends, put together from pieces (keys packed once per tuple, the
    # counts pre-packed), is byte for byte the flat command packed in one go.
    keys_of = redis_raw.KeyPacker(limit=3)  # small: the cache also starts over
    for _ in range(2):  # the second time from the cache
        keys_all = [k for keys, _ in calls for k in keys]
        counts: list[str | bytes | int] = [len(calls)]
        tail: list[str | bytes] = []
        pieces = [keys_of(keys) for keys, _ in calls]
        for i, (keys, args) in enumerate(calls):
            counts += [i + 1, len(keys), len(args)]
            tail += args
        pieces += [redis_raw.bulk_count(int(c)) for c in counts]
        pieces.append(redis_raw.bulk_items(tail))
        packed = redis_raw.evalsha(
            redis_raw.evalsha_head(sha), len(keys_all), len(counts) + len(tail), pieces
        )
        flat = ["EVALSHA", sha, len(keys_all), *keys_all, *counts, *tail]
        assert packed == redis_raw.pack(flat)


@pytest.mark.parametrize("n", [0, 1, 9, 10, 1023, 1024, 123456])
def test_bulk_count_is_the_number_packed(n: int) -> None:
    assert redis_raw.bulk_count(n) == redis_raw.bulk_items([n])


async def _evalsha(pipe: RedisPipe, sha: str, keys: list[str], args: list[object]) -> object:
    return await pipe.send(redis_raw.pack(["EVALSHA", sha, len(keys), *keys, *args]))  # type: ignore[list-item]


async def test_replies_match_redis_py(redis_client: aioredis.Redis) -> None:
    script = redis_client.register_script(ECHO)
    await redis_client.script_load(ECHO)
    keys, args = ["k:{1}", "k:{1}:b"], ["a", 42, b"\x00\xff", "ünï"]
    pipe = RedisPipe(redis_client)
    try:
        assert await _evalsha(pipe, script.sha, keys, args) == await script(keys=keys, args=args)
    finally:
        await pipe.close()


async def test_error_replies_raise_redis_pys_exceptions(redis_client: aioredis.Redis) -> None:
    pipe = RedisPipe(redis_client)
    try:
        script = redis_client.register_script("return redis.error_reply('boom')")
        await redis_client.script_load(script.script)
        with pytest.raises(ResponseError, match="boom"):
            await _evalsha(pipe, script.sha, ["k"], [])
        with pytest.raises(NoScriptError):
            await _evalsha(pipe, "0" * 40, ["k"], [])
        assert await pipe.send(redis_raw.pack(["PING"])) == b"PONG"  # still in step
    finally:
        await pipe.close()


async def test_many_commands_in_flight_get_their_own_replies(redis_client: aioredis.Redis) -> None:
    pipe = RedisPipe(redis_client)
    try:
        futs = [pipe.send(redis_raw.pack(["ECHO", f"m{i}"])) for i in range(500)]
        futs[7].cancel()  # a caller that gave up: its reply is read and dropped
        futs[8].cancel()
        replies = await asyncio.gather(*futs, return_exceptions=True)
        for i, reply in enumerate(replies):
            if i in (7, 8):
                assert isinstance(reply, asyncio.CancelledError)
            else:
                assert reply == f"m{i}".encode()
        assert pipe.in_flight == 0
    finally:
        await pipe.close()


async def test_a_reset_connection_fails_what_is_in_flight_and_reconnects(
    redis_client: aioredis.Redis,
) -> None:
    slow = redis_client.register_script(
        "local t = redis.call('TIME'); local s = t[1] + t[2] / 1e6;"
        " while true do local n = redis.call('TIME'); if n[1] + n[2] / 1e6 - s > 0.2 then"
        " break end end; return 'slow'"
    )
    await redis_client.script_load(slow.script)
    pipe = RedisPipe(redis_client)
    try:
        first = _evalsha(pipe, slow.sha, ["k"], [])
        task = asyncio.ensure_future(first)
        await asyncio.sleep(0.05)
        pipe.reset()  # as the bus does when a reply is overdue
        with pytest.raises(PipeReset):  # told apart from a server that went away
            await task
        # The slow reply must not be read as the next command's.
        assert await pipe.send(redis_raw.pack(["ECHO", "next"])) == b"next"
    finally:
        await pipe.close()


async def test_a_connection_the_server_dropped_is_replaced(
    redis_client: aioredis.Redis, redis_server: RedisServer
) -> None:
    pipe = RedisPipe(redis_client)
    try:
        own = await pipe.send(redis_raw.pack(["CLIENT", "ID"]))
        admin = aioredis.Redis.from_url(redis_server.url)
        try:
            assert await admin.client_kill_filter(_id=own) == 1  # that connection only
        finally:
            await admin.aclose()
        for _ in range(200):  # the reader sees the end; commands then get a new one
            if pipe.in_flight == 0 and pipe._writer is None:
                break
            await asyncio.sleep(0.005)
        again = await pipe.send(redis_raw.pack(["CLIENT", "ID"]))
        assert again != own
    finally:
        await pipe.close()


async def test_a_closed_pipe_refuses_and_gives_its_connection_back(
    redis_client: aioredis.Redis,
) -> None:
    pipe = RedisPipe(redis_client)
    assert await pipe.send(redis_raw.pack(["PING"])) == b"PONG"
    await pipe.close()
    with pytest.raises(RedisConnectionError):
        await pipe.send(redis_raw.pack(["PING"]))
    pool = redis_client.connection_pool
    assert not pool._in_use_connections  # type: ignore[attr-defined]
