"""Redis as a projection of the database: the guard's snapshot and blocked keys
(proxy/contract/redis_keys.py), rewritten after every transaction for the users it
touched, and all of them by `llm-proxy ledger rebuild-projection`.

One command per key, pipelined without MULTI: every key is a single user's (the
user id is a hash tag), so the writes are valid on a Redis Cluster too. The database
is the authority; a lost or stale key is repaired by the next write or a rebuild.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from proxy.contract.redis_keys import RedisKeys, encode_snapshot
from proxy.contract.timestamps import utc_now_iso
from proxy.ledger.reads import Reader

log = logging.getLogger(__name__)

RedisClient = Redis | RedisCluster

# Marker value of a blocked key the ledger set (the guard sets its own, with a TTL).
BLOCKED_BY_LEDGER = b"ledger"


class Projection:
    def __init__(self, redis: RedisClient, prefix: str) -> None:
        self._redis = redis
        self._keys = RedisKeys(prefix)

    async def write(self, balances: Iterable[tuple[int, int]]) -> int:
        """Snapshot = the balance; blocked set at <= 0 (no TTL: only credit lifts it),
        deleted above 0 (also a block the guard set from an older snapshot)."""
        now = utc_now_iso()
        count = 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for user_id, balance in balances:
                pipe.set(self._keys.snapshot(user_id), encode_snapshot(balance, now))
                if balance <= 0:
                    pipe.set(self._keys.blocked(user_id), BLOCKED_BY_LEDGER)
                else:
                    pipe.delete(self._keys.blocked(user_id))
                count += 1
            if count:
                await pipe.execute()
        return count

    async def rebuild(self, reader: Reader) -> int:
        """Rewrite every user's keys from the database; returns the number of users."""
        total = 0
        async for page in reader.balances():
            total += await self.write(page)
        return total


class ProjectionBacklog:
    """Projection writes that survive a Redis outage without holding up the ledger:
    balances that could not be written are kept (the newest per user) and written
    with the next batch. Owned by one writer (a consumer, the embedded sink)."""

    def __init__(self, projection: Projection) -> None:
        self._projection = projection
        self._pending: dict[int, int] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def write(self, balances: Mapping[int, int]) -> bool:
        """True once everything pending is in Redis; False (logged) on a Redis error."""
        self._pending.update(balances)
        if not self._pending:
            return True
        try:
            await self._projection.write(self._pending.items())
        except (RedisError, OSError) as exc:
            log.warning(
                "ledger: Redis projection of %d users deferred (%s: %s)",
                len(self._pending),
                type(exc).__name__,
                exc,
            )
            return False
        self._pending.clear()
        return True
