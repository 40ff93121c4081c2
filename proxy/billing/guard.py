"""CreditBalanceGuard: refuse requests of users known to have no credit (seed semantics).

The guard is a cheap pre-check, not the ledger: it reads what the billing side
left in Redis and only says "block" when that says the user has nothing left.
Whenever it cannot know in time (Redis down or slow, provider down) it fails
open: the request is served and charged afterwards, which can overdraw a user a
little but never turns a Redis hiccup into an outage.

Common case: no I/O at all. Both keys are mirrored in process and Redis tells us
when they change (`guard.local_cache`, proxy/billing/guard_cache.py). Otherwise, and on
a cache miss: one Redis round trip (MGET of the blocked marker and the snapshot);
concurrent checks in the same event-loop tick share one MGET (see
proxy/billing/mget_batcher.py). Key layout: proxy/contract/redis_keys.py (single
Redis node assumed: MGET and the back-fill script span several keys).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.billing.guard_cache import GuardCache
from proxy.billing.mget_batcher import MGetBatcher
from proxy.billing.payer import BillingContext
from proxy.billing.snapshot_client import SnapshotError, SnapshotSource, SnapshotView
from proxy.config.model import GuardConfig
from proxy.contract.redis_keys import RedisKeys, decode_snapshot, encode_snapshot
from proxy.logs import ThrottledLog

log = logging.getLogger(__name__)


class GuardDecision(StrEnum):
    ALLOW = "allow"
    BLOCK = "block"
    FAIL_OPEN = "fail_open"  # could not decide in time: served, logged
    SKIPPED = "skipped"  # nobody to charge, or a service said not to charge


# Writes the provider's answer unless a fresher snapshot appeared meanwhile (NX):
# the billing side writes snapshots after charges and must not be overwritten by
# an older provider read, nor its blocked marker deleted on that read's word.
# KEYS: snapshot, blocked. ARGV: snapshot json, snapshot ttl, "1" if blocked,
# blocked ttl, "1" to overwrite a snapshot that was unreadable.
_BACKFILL_LUA = """
local ok
if ARGV[5] == '1' then
  ok = redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
end
if not ok then return 0 end
if ARGV[3] == '1' then
  redis.call('SET', KEYS[2], 'provider', 'EX', ARGV[4])
else
  redis.call('DEL', KEYS[2])
end
return 1
"""

# Sets the blocked marker only if the snapshot is still the one that said "no
# credit": a grant landing between our read and this write rewrites the snapshot
# and deletes the marker, and must not be undone for blocked_ttl_s.
# KEYS: snapshot, blocked. ARGV: snapshot as read, blocked ttl.
_MARK_BLOCKED_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], 'snapshot', 'EX', ARGV[2])
  return 1
end
return 0
"""


# -- the guard ---------------------------------------------------------------------------


class CreditBalanceGuard:
    def __init__(
        self,
        redis: aioredis.Redis,
        config: GuardConfig,
        provider: SnapshotSource | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_cache_lookup: Callable[[bool], None] | None = None,
        on_cache_live: Callable[[bool], None] | None = None,
    ) -> None:
        self._config = config
        self._redis = self.redis = redis
        self._provider = provider
        self._keys = RedisKeys(config.prefix)
        self._budget_s = config.budget_ms / 1000.0
        self._batcher = MGetBatcher(redis, self._budget_s) if config.coalesce else None
        self._mget: Callable[[Sequence[str]], Awaitable[list[Any]]] = (
            self._batcher.mget if self._batcher is not None else redis.mget
        )
        self.cache = (
            GuardCache(
                redis,
                (self._keys.credit_prefix,),
                max_age_s=config.local_cache_max_age_s,
                max_entries=config.local_cache_max_entries,
                on_lookup=on_cache_lookup,
                on_live=on_cache_live,
            )
            if config.local_cache
            else None
        )
        self._backfill = redis.register_script(_BACKFILL_LUA)
        self._mark_blocked_script = redis.register_script(_MARK_BLOCKED_LUA)
        self._fetches: dict[int, asyncio.Task[SnapshotView]] = {}  # one per user at a time
        self._fail_open_log = ThrottledLog(log, config.fail_open_log_interval_s, clock)

    def start(self) -> None:
        """Start the cache's invalidation subscription (needs the running loop)."""
        if self.cache is not None:
            self.cache.start()

    async def check(self, ctx: BillingContext) -> GuardDecision:
        if ctx.user_id <= 0 or ctx.skip_charge:
            return GuardDecision.SKIPPED
        keys = (self._keys.blocked(ctx.user_id), self._keys.snapshot(ctx.user_id))
        cached = self.cache.lookup(keys) if self.cache is not None else None
        if cached is not None:
            # The common case decides without I/O, so without the budget's timer.
            blocked, snapshot = cached
            if blocked is not None:
                return GuardDecision.BLOCK
            credit = decode_snapshot(snapshot) if snapshot is not None else None
            if credit is not None and credit > 0:
                return GuardDecision.ALLOW
        try:
            async with asyncio.timeout(self._budget_s):
                return await self._decide(ctx.user_id, keys, cached)
        except TimeoutError:
            reason = f"check exceeded its {self._config.budget_ms:g} ms budget"
        except SnapshotError as exc:
            reason = str(exc)
        except (RedisError, OSError) as exc:
            reason = f"Redis error {type(exc).__name__}"
        except Exception:  # a guard bug must not take requests down: fail open, loudly
            self._fail_open_log.warning(
                "credit guard failing open: unexpected error", exc_info=True
            )
            return GuardDecision.FAIL_OPEN
        self._fail_open_log.warning(f"credit guard failing open: {reason}")
        return GuardDecision.FAIL_OPEN

    @property
    def has_provider(self) -> bool:
        return self._provider is not None

    async def fetch_snapshot(self, user_id: int, *, overwrite: bool) -> SnapshotView:
        """Ask the provider (one fetch per user at a time) and back-fill Redis; the
        caller's budget ends its wait, not the fetch."""
        return await asyncio.shield(self._fetch(user_id, overwrite=overwrite))

    async def close(self) -> None:
        """Stop in-flight provider fetches and reads (call on shutdown, before Redis)."""
        tasks = list(self._fetches.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._batcher is not None:
            await self._batcher.aclose()
        if self.cache is not None:
            await self.cache.aclose()

    # -- steps -----------------------------------------------------------------------

    async def _decide(
        self, user_id: int, keys: tuple[str, str], cached: list[Any] | None
    ) -> GuardDecision:
        if cached is not None:
            blocked, snapshot = cached
        elif self.cache is not None:
            blocked, snapshot = await self.cache.read_through(keys, self._mget)
        else:
            blocked, snapshot = await self._mget(keys)
        if blocked is not None:
            return GuardDecision.BLOCK
        credit = decode_snapshot(snapshot) if snapshot is not None else None
        if credit is not None:
            if credit > 0:
                return GuardDecision.ALLOW
            await self._mark_blocked(keys, snapshot)
            return GuardDecision.BLOCK
        if self._provider is None:
            if snapshot is not None:
                # Unreadable is "missing", never "has credit": with nobody to ask,
                # the call is served as a fail-open (counted, logged), not allowed.
                self._fail_open_log.warning(
                    "credit guard failing open: unreadable snapshot and no snapshot provider"
                )
                return GuardDecision.FAIL_OPEN
            # Nothing to go on and no provider configured: the seed rule blocks only
            # on evidence of no credit, so allow (the billing side charges later).
            return GuardDecision.ALLOW
        # Shielded: the caller's budget or disconnect ends its wait, not the fetch,
        # which still back-fills Redis for the next request.
        snap = await asyncio.shield(self._fetch(user_id, overwrite=snapshot is not None))
        if snap.is_blocked or snap.balance <= 0:
            return GuardDecision.BLOCK
        return GuardDecision.ALLOW

    async def _mark_blocked(self, keys: tuple[str, str], snapshot: bytes) -> None:
        try:
            await self._mark_blocked_script(
                keys=[keys[1], keys[0]], args=[snapshot, self._config.blocked_ttl_s]
            )
        except (RedisError, OSError) as exc:
            # The snapshot already said "no credit"; the marker is only a shortcut.
            self._fail_open_log.warning(f"could not set blocked marker: {type(exc).__name__}")

    def _fetch(self, user_id: int, *, overwrite: bool) -> asyncio.Task[SnapshotView]:
        task = self._fetches.get(user_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._fetch_and_backfill(user_id, overwrite)
            )
            self._fetches[user_id] = task
            task.add_done_callback(lambda t: self._fetch_done(user_id, t))
        return task

    def _fetch_done(self, user_id: int, task: asyncio.Task[SnapshotView]) -> None:
        self._fetches.pop(user_id, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have given up already

    async def _fetch_and_backfill(self, user_id: int, overwrite: bool) -> SnapshotView:
        assert self._provider is not None
        snap = await self._provider.fetch(user_id)
        c = self._config
        blocked = snap.is_blocked or snap.balance <= 0
        try:
            async with asyncio.timeout(c.provider_timeout_s):
                await self._backfill(
                    keys=[self._keys.snapshot(user_id), self._keys.blocked(user_id)],
                    args=[
                        encode_snapshot(snap.balance),
                        c.snapshot_ttl_s,
                        "1" if blocked else "0",
                        c.blocked_ttl_s,
                        "1" if overwrite else "0",
                    ],
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self._fail_open_log.warning(f"snapshot back-fill failed: {type(exc).__name__}")
        return snap
