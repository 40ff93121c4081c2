"""Redis as a projection of the database: the guard's snapshot and blocked keys
(proxy/contract/redis_keys.py), rewritten after every transaction for the users it
touched, and all of them by `llm-proxy ledger rebuild-projection`.

One script per user, pipelined without MULTI: it rewrites the snapshot and the
blocked marker and deletes the holds of the request ids the transaction applied,
in one step, so a reservation (proxy.billing.reservations) never sees the debit
without the release or the release without the debit. Every key of the script is
the user's (the user id is a hash tag), so it is valid on a Redis Cluster too. The
database is the authority; a lost or stale key is repaired by the next write or a
rebuild, and a hold the ledger never deletes expires on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from proxy.contract.charge_event import ChargeEvent
from proxy.contract.redis_keys import RedisKeys, encode_snapshot
from proxy.contract.timestamps import utc_now_iso
from proxy.ledger.reads import Reader

log = logging.getLogger(__name__)

RedisClient = Redis | RedisCluster

# Marker value of a blocked key the ledger set (the guard sets its own, with a TTL).
BLOCKED_BY_LEDGER = b"ledger"

# KEYS: snapshot, blocked, holds, holds total, holds expiry (proxy.contract.redis_keys:
# the total and the index follow every hold deleted). ARGV: snapshot, "1" blocked /
# "0", request ids... A hold the index does not know is deleted alone: the total
# never counted it (the next reservation finds the keys out of step and recounts).
_PROJECT_LUA = """
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  redis.call('SET', KEYS[2], 'ledger')
else
  redis.call('DEL', KEYS[2])
end
if #ARGV < 3 then return 1 end
local H, S, X = KEYS[3], KEYS[4], KEYS[5]
local freed = 0
for i = 3, #ARGV, 500 do
  local ids = {unpack(ARGV, i, math.min(i + 499, #ARGV))}
  local vals = redis.call('HMGET', H, unpack(ids))
  for j = 1, #ids do
    local v = vals[j]
    if v then
      redis.call('HDEL', H, ids[j])
      if redis.call('ZREM', X, ids[j]) == 1 then
        freed = freed + (tonumber(string.match(v, '^(%d+):') or '0') or 0)
      end
    end
  end
end
if freed > 0 and redis.call('EXISTS', S) == 1 then
  redis.call('INCRBYFLOAT', S, string.format('%.17g', -freed))
end
return 1
"""

Releases = Mapping[int, Collection[str]]  # user -> request ids whose holds go


class Projection:
    def __init__(self, redis: RedisClient, prefix: str) -> None:
        self._redis = redis
        self._keys = RedisKeys(prefix)

    async def write(
        self, balances: Iterable[tuple[int, int]], releases: Releases | None = None
    ) -> int:
        """Snapshot = the balance; blocked set at <= 0 (no TTL: only credit lifts it),
        deleted above 0 (also a block the guard set from an older snapshot); the
        holds of `releases[user]` deleted in the same script."""
        now = utc_now_iso()
        count = 0
        releases = releases or {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for user_id, balance in balances:
                keys = self._keys
                args = [
                    encode_snapshot(balance, now),
                    "1" if balance <= 0 else "0",
                    *releases.get(user_id, ()),
                ]
                pipe.eval(
                    _PROJECT_LUA,
                    5,
                    keys.snapshot(user_id),
                    keys.blocked(user_id),
                    *keys.hold_keys(user_id),
                    *args,
                )
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
        self._releases: dict[int, set[str]] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def write(self, balances: Mapping[int, int], releases: Releases | None = None) -> bool:
        """True once everything pending is in Redis; False (logged) on a Redis error.
        Deferred releases wait with their user's balance: neither goes without the
        other."""
        self._pending.update(balances)
        for user_id, request_ids in (releases or {}).items():
            if user_id in self._pending:
                self._releases.setdefault(user_id, set()).update(request_ids)
        if not self._pending:
            return True
        try:
            await self._projection.write(self._pending.items(), self._releases)
        except (RedisError, OSError) as exc:
            log.warning(
                "ledger: Redis projection of %d users deferred (%s: %s)",
                len(self._pending),
                type(exc).__name__,
                exc,
            )
            return False
        self._pending.clear()
        self._releases.clear()
        return True


def releases_of(events: Iterable[ChargeEvent]) -> dict[int, list[str]]:
    """user -> request ids of a batch's charge events (applied, duplicates, refused
    alike: each one's hold has served its purpose once the batch is settled)."""
    out: dict[int, list[str]] = {}
    for event in events:
        if event.request_id:
            out.setdefault(event.user_id, []).append(event.request_id)
    return out
