"""SNAPSHOT_LUA run by a real Redis writes exactly what encode_snapshot writes."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.contract.redis_keys import SNAPSHOT_LUA, RedisKeys, decode_snapshot, encode_snapshot

STAMP = "2024-05-01T12:00:00.123Z"
# The including scripts define `bal` from their own arguments; this one from ARGV[1].
SCRIPT = "local bal = tonumber(ARGV[1])\n" + SNAPSHOT_LUA + "\nreturn 1\n"


@pytest.mark.parametrize("balance", [0, 1, -1, 1500, 123_456_789_012, -(2**40), 2**53])
async def test_snapshot_lua_writes_the_encode_snapshot_json(
    redis_client: Any, redis_prefix: str, balance: int
) -> None:
    keys = RedisKeys(redis_prefix)
    target = keys.snapshot(7)
    unused = [f"{redis_prefix}unused:1", f"{redis_prefix}unused:2"]
    assert await redis_client.eval(SCRIPT, 3, *unused, target, str(balance), "", STAMP) == 1
    raw = await redis_client.get(target)
    assert raw == encode_snapshot(balance, STAMP)
    assert decode_snapshot(raw) == balance
    assert await redis_client.exists(*unused) == 0
