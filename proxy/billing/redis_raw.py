"""One script call as pre-packed bytes on one of redis-py's pooled connections.

The batched script calls (proxy.billing.script_batcher) carry every call of a loop
tick in one EVALSHA: tens of arguments, which redis-py packs one by one through its
encoder (~10% of the full pipeline's CPU at saturation, bench/RESULTS.md). Packing
them here is one format per argument. Only for a single Redis node; a cluster
client routes by key and stays on redis-py's own path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

Arg = str | bytes | int


def pack(args: Sequence[Arg]) -> bytes:
    """The RESP array of bulk strings for `args`, packed in C (hiredis, a dependency
    through redis[hiredis]): ~3.5x faster than redis-py's per-argument packer."""
    packed: bytes = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]
    return packed


async def execute(redis: aioredis.Redis, packed: bytes) -> Any:
    """Send one packed command, return its reply (an error reply raises, as redis-py
    does). No read timeout of its own: callers bound the whole call, and a cancelled
    or failed read disconnects the connection (half-read, it is not reusable). A
    connection error is retried once on a fresh connection, as redis-py's default
    retry does: a pooled connection the server dropped (a restart) fails that way."""
    pool = redis.connection_pool
    for attempt in (1, 2):
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(packed, check_health=False)
            return await conn.read_response(timeout=math.inf)
        except RedisConnectionError:
            if attempt == 2:
                raise
        finally:
            await pool.release(conn)
    raise AssertionError("unreachable")


async def evalsha(
    redis: aioredis.Redis, script: Any, keys: Sequence[Arg], args: Sequence[Arg]
) -> Any:
    """EVALSHA of a redis-py `Script`; a server that lost it gets it loaded first."""
    packed = pack(["EVALSHA", script.sha, len(keys), *keys, *args])
    try:
        return await execute(redis, packed)
    except NoScriptError:
        await redis.script_load(script.script)
        return await execute(redis, packed)
