"""Credit held by requests in flight (`held` of the balance), read through
`HeldSource`: from the guard's Redis holds (proxy/contract/redis_keys.py) when there
is Redis, else nothing (`NoHolds`); an embedded source can plug in the same way."""

from __future__ import annotations

import time
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from proxy.contract.redis_keys import RedisKeys, live_held
from proxy.errors import ledger_unavailable


class HeldSource(Protocol):
    async def held(self, user_id: int) -> int: ...


class NoHolds:
    async def held(self, user_id: int) -> int:
        return 0


class RedisHolds:
    def __init__(self, redis: Redis | RedisCluster, prefix: str) -> None:
        self._redis = redis
        self._keys = RedisKeys(prefix)

    async def held(self, user_id: int) -> int:
        try:
            values = await self._redis.hvals(self._keys.holds(user_id))
        except (RedisError, OSError) as exc:
            raise ledger_unavailable("credit hold store (Redis)") from exc
        return live_held(values, int(time.time() * 1000))
