"""CreditBalanceGuard: refuse requests of users known to have no credit (seed semantics).

The guard is a cheap pre-check, not the ledger: it reads what the billing side
left in Redis and only says "block" when that says the user has nothing left.
Whenever it cannot know in time (Redis down or slow, provider down) it fails
open: the request is served and charged afterwards, which can overdraw a user a
little but never turns a Redis hiccup into an outage.

Common case: no I/O at all. Both keys are mirrored in process and Redis tells us
when they change (`guard.local_cache`, proxy/guard_cache.py). Otherwise, and on
a cache miss: one Redis round trip (MGET of the blocked marker and the snapshot);
concurrent checks in the same event-loop tick share one MGET (see `_MGetBatcher`;
bench/bench_guard.py measures it). Redis keys (single Redis node assumed: MGET
and the back-fill script span several keys):

* `<prefix>credit:blocked:<user_id>`  any value = blocked; TTL blocked_ttl_s.
* `<prefix>credit:snapshot:<user_id>` JSON `{"available_credit": int,
  "updated_at": iso8601}`; TTL snapshot_ttl_s when back-filled by the guard.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.auth_config import parse_number
from proxy.billing import BillingContext
from proxy.errors import ApiError, ConfigError
from proxy.guard_cache import GuardCache
from proxy.snapshot import Snapshot, SnapshotError, SnapshotProvider

log = logging.getLogger(__name__)


class GuardDecision(StrEnum):
    ALLOW = "allow"
    BLOCK = "block"
    FAIL_OPEN = "fail_open"  # could not decide in time: served, logged
    SKIPPED = "skipped"  # nobody to charge, or a service said not to charge


def insufficient_credit_error() -> ApiError:
    """What a `block` decision is answered with (HTTP 402)."""
    return ApiError(
        402,
        "Your credit balance is insufficient for this request. Please top up and retry.",
        type="insufficient_quota",
        code="credit_balance_insufficient",
    )


@dataclass(frozen=True, slots=True)
class GuardConfig:
    prefix: str = "llmproxy:"
    budget_ms: float = 50.0  # the whole check, Redis included; then fail open
    blocked_ttl_s: int = 300
    snapshot_ttl_s: int = 300
    provider_timeout_s: float = 1.0
    fail_open_log_interval_s: float = 60.0
    coalesce: bool = True  # batch concurrent checks into one MGET (bench/bench_guard.py)
    # Keep what was read in process, kept coherent by Redis invalidations
    # (proxy/guard_cache.py); max_age bounds staleness should an invalidation be missed.
    local_cache: bool = True
    local_cache_max_age_s: float = 1.0
    local_cache_max_entries: int = 100_000

    @classmethod
    def from_yaml(cls, raw: Any, path: str = "guard") -> GuardConfig:
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: must be a mapping, got {type(raw).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        for key in raw:
            if key not in known:
                raise ConfigError(f"{path}.{key}: unknown key (known: {', '.join(sorted(known))})")
        d = cls()
        prefix = raw.get("prefix", d.prefix)
        if not isinstance(prefix, str) or any(c.isspace() for c in prefix):
            raise ConfigError(f"{path}.prefix: must be a string without spaces, got {prefix!r}")
        flags = {}
        for flag in ("coalesce", "local_cache"):
            value = raw.get(flag, getattr(d, flag))
            if not isinstance(value, bool):
                raise ConfigError(f"{path}.{flag}: must be true or false, got {value!r}")
            flags[flag] = value
        return cls(
            prefix=prefix,
            budget_ms=parse_number(raw, "budget_ms", path, d, positive=True),
            blocked_ttl_s=int(
                parse_number(raw, "blocked_ttl_s", path, d, whole=True, positive=True)
            ),
            snapshot_ttl_s=int(
                parse_number(raw, "snapshot_ttl_s", path, d, whole=True, positive=True)
            ),
            provider_timeout_s=parse_number(raw, "provider_timeout_s", path, d, positive=True),
            fail_open_log_interval_s=parse_number(raw, "fail_open_log_interval_s", path, d),
            local_cache_max_age_s=parse_number(
                raw, "local_cache_max_age_s", path, d, positive=True
            ),
            local_cache_max_entries=_at_least_two(
                int(
                    parse_number(raw, "local_cache_max_entries", path, d, whole=True, positive=True)
                ),
                f"{path}.local_cache_max_entries",
            ),
            **flags,
        )


def _at_least_two(value: int, where: str) -> int:
    if value < 2:
        raise ConfigError(f"{where}: must be at least 2 (each user takes two entries)")
    return value


# -- Redis layout --------------------------------------------------------------------


def blocked_key(prefix: str, user_id: int | str) -> str:
    return f"{prefix}credit:blocked:{user_id}"


def snapshot_key(prefix: str, user_id: int | str) -> str:
    return f"{prefix}credit:snapshot:{user_id}"


def encode_snapshot(available_credit: int, updated_at: datetime | None = None) -> bytes:
    when = (updated_at or datetime.now(UTC)).isoformat().replace("+00:00", "Z")
    return orjson.dumps({"available_credit": available_credit, "updated_at": when})


def decode_snapshot(raw: bytes) -> int | None:
    """available_credit, or None when the value is not a snapshot (then it is refetched).

    `updated_at` is informational (for people and the billing side); the TTL is
    what bounds staleness here.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    credit = data.get("available_credit") if isinstance(data, dict) else None
    if not isinstance(credit, int) or isinstance(credit, bool):
        return None
    return credit


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


# -- helpers ---------------------------------------------------------------------------


class _RateLimitedLog:
    """At most one warning per interval; counts what it swallowed in between."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self._interval = interval_s
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def warning(self, message: str, *, exc_info: bool = False) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return
        suppressed, self._suppressed, self._last = self._suppressed, 0, now
        log.warning("%s (%d similar suppressed)", message, suppressed, exc_info=exc_info)


_Waiter = tuple[Sequence[str], "asyncio.Future[list[Any]]"]


class _MGetBatcher:
    """Concurrent MGETs issued in one loop tick go out as one MGET.

    The first caller of a tick is the leader: it yields once (`sleep(0)`) so the
    callers that become ready in the same tick can append their keys, then sends
    one MGET for all and hands each follower its slice. The leader does the I/O
    itself rather than through a flush task: bench/bench_guard.py measured a
    task-per-flush batcher at +20-30 us CPU for a lone caller, this one at about
    the cost of a plain MGET, and both ~4-5x cheaper per check at 64 concurrent.
    If the leader is cancelled mid-read, the followers get a read of their own.
    """

    def __init__(self, redis: aioredis.Redis, timeout_s: float) -> None:
        self._redis = redis
        self._timeout = timeout_s
        self._followers: list[_Waiter] | None = None  # open batch of the current tick
        self._tasks: set[asyncio.Task[None]] = set()

    async def mget(self, keys: Sequence[str]) -> list[Any]:
        if self._followers is not None:
            fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            self._followers.append((keys, fut))
            return await fut
        self._followers = followers = []
        try:
            await asyncio.sleep(0)  # let this tick's other callers join
        except asyncio.CancelledError:
            # Cancelled before sending: whoever joined still needs its read.
            self._followers = None
            self._serve_orphans(followers)
            raise
        finally:
            self._followers = None
        all_keys = list(keys)
        for more, _ in followers:
            all_keys.extend(more)
        try:
            values = await self._redis.mget(all_keys)
        except asyncio.CancelledError:
            self._serve_orphans(followers)
            raise
        except Exception as exc:
            for _, fut in followers:
                if not fut.done():
                    fut.set_exception(exc)
            raise
        i = len(keys)
        for more, fut in followers:
            if not fut.done():
                fut.set_result(values[i : i + len(more)])
            i += len(more)
        return values[: len(keys)]

    def _serve_orphans(self, followers: list[_Waiter]) -> None:
        waiting = [(keys, fut) for keys, fut in followers if not fut.done()]
        if waiting:
            task = asyncio.get_running_loop().create_task(self._read_for(waiting))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read_for(self, waiting: list[_Waiter]) -> None:
        # Own timeout: nobody's budget bounds this task, and a hung Redis must
        # not keep connections busy for reads nobody waits for any more.
        try:
            async with asyncio.timeout(self._timeout):
                values = await self._redis.mget([k for keys, _ in waiting for k in keys])
        except Exception as exc:
            for _, fut in waiting:
                if not fut.done():
                    fut.set_exception(exc)
            return
        except BaseException:  # cancelled (shutdown): leave nobody hanging
            for _, fut in waiting:
                if not fut.done():
                    fut.cancel()
            raise
        i = 0
        for keys, fut in waiting:
            if not fut.done():
                fut.set_result(values[i : i + len(keys)])
            i += len(keys)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- the guard ---------------------------------------------------------------------------


class CreditBalanceGuard:
    def __init__(
        self,
        redis: aioredis.Redis,
        config: GuardConfig,
        provider: SnapshotProvider | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_cache_lookup: Callable[[bool], None] | None = None,
        on_cache_live: Callable[[bool], None] | None = None,
    ) -> None:
        self._config = config
        self._redis = redis
        self._provider = provider
        self._budget_s = config.budget_ms / 1000.0
        self._batcher = _MGetBatcher(redis, self._budget_s) if config.coalesce else None
        self._mget: Callable[[Sequence[str]], Awaitable[list[Any]]] = (
            self._batcher.mget if self._batcher is not None else redis.mget
        )
        self.cache = (
            GuardCache(
                redis,
                (blocked_key(config.prefix, ""), snapshot_key(config.prefix, "")),
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
        self._fetches: dict[int, asyncio.Task[Snapshot]] = {}  # one per user at a time
        self._fail_open_log = _RateLimitedLog(config.fail_open_log_interval_s, clock)

    def start(self) -> None:
        """Start the cache's invalidation subscription (needs the running loop)."""
        if self.cache is not None:
            self.cache.start()

    async def check(self, ctx: BillingContext) -> GuardDecision:
        if ctx.user_id <= 0 or ctx.skip_charge:
            return GuardDecision.SKIPPED
        prefix = self._config.prefix
        keys = (blocked_key(prefix, ctx.user_id), snapshot_key(prefix, ctx.user_id))
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

    def _fetch(self, user_id: int, *, overwrite: bool) -> asyncio.Task[Snapshot]:
        task = self._fetches.get(user_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._fetch_and_backfill(user_id, overwrite)
            )
            self._fetches[user_id] = task
            task.add_done_callback(lambda t: self._fetch_done(user_id, t))
        return task

    def _fetch_done(self, user_id: int, task: asyncio.Task[Snapshot]) -> None:
        self._fetches.pop(user_id, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have given up already

    async def _fetch_and_backfill(self, user_id: int, overwrite: bool) -> Snapshot:
        assert self._provider is not None
        snap = await self._provider.fetch(user_id)
        c = self._config
        blocked = snap.is_blocked or snap.balance <= 0
        try:
            async with asyncio.timeout(c.provider_timeout_s):
                await self._backfill(
                    keys=[snapshot_key(c.prefix, user_id), blocked_key(c.prefix, user_id)],
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
