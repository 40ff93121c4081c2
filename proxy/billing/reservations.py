"""Reservations on Redis: admission holds credit before the call, settlement rewrites
the hold to the charge, the ledger deletes it when it debits (proxy.ledger.projection).

One script per step, touching one user's keys only (snapshot, blocked, holds share
the user's hash tag, so the scripts run on a Redis Cluster too). Holds live in the
hash `holds:{uid}`, request id -> "<credits>:<expires_at_ms>" (Redis clock;
proxy.contract.redis_keys), with their running total and an expiry index, so that
no script walks a user's live holds. The reserve script, atomically:

1. purges the holds past their expiry, from the index (returned, for the `expired`
   metric);
2. refuses when the user is blocked or has no snapshot (the caller then asks the
   ledger, through the snapshot provider, and tries once more);
3. admits iff `available - held >= estimate` (held: the total), writing the hold with expiry
   now + hold_ttl_s; in clamp mode, when only `floor <= available - held` holds, it
   holds all of `available - held` and the caller lowers the output limit to fit.

A reservation may carry another script's call to run in the same script call when
it admits (`chain`): the rate limiter's admission, so that a request's two admission
steps are one round trip (proxy.billing.admission).

The settle script rewrites a hold that still exists (the ledger may have applied the
charge already: then it is not brought back) to the actual charge, with a fresh
expiry covering the ledger's lag, or deletes it when the charge is 0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from proxy.billing.guard import CreditBalanceGuard, GuardDecision
from proxy.billing.hold import Hold, Reservation, Reserved
from proxy.billing.payer import BillingContext
from proxy.billing.script_batcher import BusCall, BusChain, BusScript, ScriptBus
from proxy.config.model import FailPolicy, GuardConfig
from proxy.contract.redis_keys import RedisKeys
from proxy.logs import ThrottledLog

log = logging.getLogger(__name__)

# The holds of one user: the hash (request id -> "<credits>:<expires_at_ms>"), its
# running total and its expiry index (proxy.contract.redis_keys), kept in step by
# every script that writes them. `_HOLDS_LUA` is shared by the scripts:
# - `bump`: the three keys live at least `ttl` ms more (2 x ttl when extended, so
#   that it happens once per ttl, not on every write; they expire together);
# - `recount`: sums the hash as a whole (purging what is unreadable or due),
#   rebuilds the total and the index; returns (held, expired);
# - `purge`: drops the holds due at `now`, found by the index (no walk over the
#   live ones); returns (held, expired), recounting instead when the three are out
#   of step (the hash deleted, or written by something that does not keep them:
#   HLEN != ZCARD, a due index entry without its hold, a negative total) or when
#   `audit` says so.
# Sums are Lua numbers, as before (exact to 2^53), stored with INCRBYFLOAT
# (keeps the key's TTL; never overflows).
_HOLDS_LUA = """
local function bump(H, S, X, now, ttl)
  if redis.call('PTTL', H) < ttl then
    local at = now + 2 * ttl  -- one instant for the three: they expire together
    redis.call('PEXPIREAT', H, at)
    redis.call('PEXPIREAT', S, at)
    redis.call('PEXPIREAT', X, at)
  end
end
local function recount(H, S, X, now)
  redis.call('DEL', X, S)
  local fields = redis.call('HGETALL', H)
  local held, expired, live, last = 0, 0, 0, 0
  for i = 1, #fields, 2 do
    local c, e = string.match(fields[i + 1], '^(%d+):(%d+)$')
    if c == nil or tonumber(e) <= now then
      redis.call('HDEL', H, fields[i])
      if c ~= nil then expired = expired + 1 end
    else
      held, live = held + tonumber(c), live + 1
      last = math.max(last, tonumber(e))
      redis.call('ZADD', X, e, fields[i])
    end
  end
  if live > 0 then
    redis.call('SET', S, string.format('%.17g', held))
    local p = redis.call('PTTL', H)
    if p > 0 then  -- one instant for the three, not before their last hold
      local at = math.max(now + p, last)
      redis.call('PEXPIREAT', H, at)
      redis.call('PEXPIREAT', S, at)
      redis.call('PEXPIREAT', X, at)
    end
  end
  return held, expired
end
local function purge(H, S, X, now, audit)
  local n = redis.call('HLEN', H)
  if audit or n ~= redis.call('ZCARD', X) then return recount(H, S, X, now) end
  if n == 0 then
    redis.call('DEL', S)
    return 0, 0
  end
  local held = tonumber(redis.call('GET', S) or 'x')
  if held == nil or held < 0 then return recount(H, S, X, now) end
  local due = redis.call('ZRANGEBYSCORE', X, '-inf', now)
  if #due == 0 then return held, 0 end
  local freed, expired, later = 0, 0, {}
  for i = 1, #due, 500 do
    local ids = {unpack(due, i, math.min(i + 499, #due))}
    local vals = redis.call('HMGET', H, unpack(ids))
    local gone = {}
    for j = 1, #ids do
      local v = vals[j]
      if not v then return recount(H, S, X, now) end
      local c, e = string.match(v, '^(%d+):(%d+)$')
      if c ~= nil and tonumber(e) > now then
        -- the hash says later (rewritten by something that left the index)
        later[#later + 1] = e
        later[#later + 1] = ids[j]
      else
        gone[#gone + 1] = ids[j]
        if c ~= nil then
          freed, expired = freed + tonumber(c), expired + 1
        end
      end
    end
    if #gone > 0 then redis.call('HDEL', H, unpack(gone)) end
  end
  if freed > held then return recount(H, S, X, now) end
  redis.call('ZREMRANGEBYSCORE', X, '-inf', now)
  for i = 1, #later, 2 do redis.call('ZADD', X, later[i], later[i + 1]) end
  if freed > 0 then redis.call('INCRBYFLOAT', S, string.format('%.17g', -freed)) end
  return held - freed, expired
end
"""

# KEYS: snapshot, blocked, holds, holds total, holds expiry. ARGV[1]: "<estimate>
# <floor> <ttl ms> <blocked ttl s> <request id>" (one argument: redis-py's packing is
# most of a call's CPU): floor is the least clamp mode may hold (0: refuse below the
# estimate); the blocked marker is set when the snapshot says no credit at all.
# Returns {code, available, held by others, expired purged, credits held}; codes:
# 1 admitted, 2 clamped, 0 refused, 3 request id already holding, -1 no snapshot,
# -2 blocked, -3 unreadable snapshot.
_RESERVE_LUA = (
    _HOLDS_LUA
    + """
local est, flo, ttl_ms, bttl, rid = string.match(ARGV[1], '^(%d+) (%d+) (%d+) (%d+) (.*)$')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local H, S, X = KEYS[3], KEYS[4], KEYS[5]
-- About one reservation in 1024 (by the clock's microseconds) sums the hash anyway:
-- writers that keep the hash but not the total (older versions) can change a hold
-- in place, which no count shows; this bounds how long such a drift lasts.
local held, expired = purge(H, S, X, now, tonumber(t[2]) % 1024 == 0)
local raw = redis.call('GET', KEYS[1])
if not raw then return {-1, 0, held, expired, 0} end
local ok, data = pcall(cjson.decode, raw)
local available = nil
if ok and type(data) == 'table' then
  local v = data['available_credit']
  if type(v) == 'number' or type(v) == 'string' then available = tonumber(v) end
end
if available == nil or available ~= available then return {-3, 0, held, expired, 0} end
available = math.ceil(available)
if redis.call('EXISTS', KEYS[2]) == 1 then return {-2, available, held, expired, 0} end
if available <= 0 then
  -- the marker lets every proxy's cache refuse this user without I/O
  redis.call('SET', KEYS[2], 'snapshot', 'EX', bttl)
  return {-2, available, held, expired, 0}
end
if redis.call('HEXISTS', H, rid) == 1 then return {3, available, held, expired, 0} end
local estimate, floor = tonumber(est), tonumber(flo)
local room = available - held
local take, code = 0, 0
if room >= estimate then
  take, code = estimate, 1
elseif floor > 0 and room >= floor then
  take, code = room, 2
else
  return {0, available, held, expired, 0}
end
if take > 0 then
  local ttl = tonumber(ttl_ms)
  local expires = now + ttl
  redis.call('HSET', H, rid, string.format('%d:%d', take, expires))
  redis.call('ZADD', X, expires, rid)
  redis.call('INCRBYFLOAT', S, string.format('%.17g', take))
  bump(H, S, X, now, ttl)
end
return {code, available, held, expired, take}
"""
)

# KEYS: holds, holds total, holds expiry. ARGV[1]: "<credits (0: release)> <ttl ms>
# <request id>". 1 if the hold existed. The total follows only a hold the index
# knows (one written by something that does not keep them is rewritten alone: the
# next reservation finds the keys out of step and recounts), and only while it
# exists (else the next reservation recounts).
_SETTLE_LUA = (
    _HOLDS_LUA
    + """
local credits, ttl_ms, rid = string.match(ARGV[1], '^(%d+) (%d+) (.*)$')
local H, S, X = KEYS[1], KEYS[2], KEYS[3]
local v = redis.call('HGET', H, rid)
if not v then return 0 end
local indexed = redis.call('ZSCORE', X, rid) and redis.call('EXISTS', S) == 1
local old = tonumber(string.match(v, '^(%d+):') or '0')
if credits == '0' then
  redis.call('HDEL', H, rid)
  if indexed then
    redis.call('ZREM', X, rid)
    if old > 0 then redis.call('INCRBYFLOAT', S, string.format('%.17g', -old)) end
  end
  return 1
end
local t = redis.call('TIME')
local ttl = tonumber(ttl_ms)
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = now + ttl
redis.call('HSET', H, rid, credits .. ':' .. string.format('%d', expires))
if indexed then
  redis.call('ZADD', X, expires, rid)
  local delta = tonumber(credits) - old
  if delta ~= 0 then redis.call('INCRBYFLOAT', S, string.format('%.17g', delta)) end
end
bump(H, S, X, now, ttl)
return 1
"""
)

_KEYS_CACHED = 4096  # users whose Redis key names are kept

_CODES = {1: Reserved.ADMITTED, 2: Reserved.CLAMPED, 0: Reserved.REFUSED, 3: Reserved.CONFLICT}
_MISSING, _BLOCKED, _UNREADABLE = -1, -2, -3

# reservation results (and "expired") -> counter; credit held by this process, delta
OnReservation = Callable[[str, int], None]
OnHeld = Callable[[int], None]


def _ignore(*_: object) -> None:
    return None


class RedisReservations:
    """The reserve-mode guard on Redis; `check` stays the original pre-check."""

    def __init__(
        self,
        guard: CreditBalanceGuard,
        config: GuardConfig,
        *,
        on_reservation: OnReservation = _ignore,
        on_held: OnHeld = _ignore,
        clock: Callable[[], float] = time.monotonic,
        bus: ScriptBus | None = None,
    ) -> None:
        self.guard = guard
        self._config = config
        self._keys = RedisKeys(config.prefix)
        # The scripts share the Redis client's bus with the rate limiter's (one
        # command per loop tick for all of them: proxy/billing/script_batcher.py).
        self._own_bus = bus is None
        self._bus = bus = bus if bus is not None else ScriptBus(guard.redis)
        flush_s = max(config.budget_ms / 1000.0, config.provider_timeout_s)
        self._reserves = bus.register(_RESERVE_LUA, flush_s)
        self._settles = bus.register(_SETTLE_LUA, flush_s)
        self._chains: dict[BusScript, BusChain] = {}
        self._budget_s = config.budget_ms / 1000.0
        self._ttl_ms = int(config.hold_ttl_s * 1000)
        self._key_names: dict[int, tuple[str, ...]] = {}
        self._on_reservation = on_reservation
        self._on_held = on_held
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = ThrottledLog(log, config.fail_open_log_interval_s, clock)

    def chain(self, then: BusScript) -> bool:
        """Let reservations carry calls of `then` (`reserve(..., then=)`): run in the
        same script call when the reservation admits (code 1; not when clamped, which
        changes the request). False when `then` is another Redis client's."""
        if then.bus is not self._bus:
            return False
        if then not in self._chains:
            self._chains[then] = self._bus.chain(self._reserves, then, (1,))
        return True

    @property
    def cache(self) -> Any:
        return self.guard.cache

    def start(self) -> None:
        """Start the cache's subscription and load the scripts (so that the first
        request does not pay for it within its budget); needs the running loop."""
        self.guard.start()
        task = asyncio.get_running_loop().create_task(self._load_scripts())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load_scripts(self) -> None:
        redis: Any = self.guard.redis
        try:
            async with asyncio.timeout(5):
                for script in self._bus.scripts:
                    await redis.script_load(script.script)
        except Exception as exc:  # loaded on first use instead
            log.info("credit guard: scripts not preloaded (%s)", type(exc).__name__)

    async def check(self, ctx: BillingContext) -> GuardDecision:
        return await self.guard.check(ctx)

    async def reserve(
        self, hold: Hold, estimate: int, floor: int, then: BusCall | None = None
    ) -> Reservation:
        user = hold.user_id
        keys = self._user_keys(user)
        cache = self.guard.cache
        if cache is not None:
            cached = cache.lookup((keys[1],))
            if cached is not None and cached[0] is not None:
                return self._count(Reservation(Reserved.REFUSED))  # blocked: no I/O
        stage = f"reservation exceeded its {self._config.budget_ms:g} ms budget"
        try:
            # within the budget; `then`'s reply, when it ran
            reply, then_reply = await self._first_run(keys, hold, estimate, floor, then)
            if reply[0] in (_MISSING, _UNREADABLE) and self.guard.has_provider:
                # Decided from the ledger, within the provider's own time bound: its
                # answer is written back, then the script runs again on it (a user
                # the ledger does not know has 0).
                stage = "the snapshot provider timed out"
                async with asyncio.timeout(self._config.provider_timeout_s + self._budget_s):
                    snap = await self.guard.fetch_snapshot(user, overwrite=reply[0] != _MISSING)
                    reply, _ = await self._run(keys, hold, estimate, floor)
                if reply[0] in (_MISSING, _UNREADABLE):  # the back-fill failed
                    if snap.is_blocked or snap.balance < estimate:
                        return self._count(Reservation(Reserved.REFUSED, 0, snap.balance))
                    return self._fail("snapshot back-fill did not land")
        except TimeoutError:
            return self._fail(stage)
        except (RedisError, OSError) as exc:
            return self._fail(f"Redis error {type(exc).__name__}")
        except Exception as exc:  # a provider failure (SnapshotError), a guard bug
            self._log.warning("credit guard: reservation failed", exc_info=True)
            return self._fail(f"{type(exc).__name__}")
        code, available, held, expired, taken = reply
        if expired:
            self._on_reservation("expired", expired)
        if code == _MISSING:
            return self._count(Reservation(Reserved.REFUSED, 0, 0, held))  # nobody's credit
        if code == _BLOCKED:
            return self._count(Reservation(Reserved.REFUSED, 0, available, held))
        if code == _UNREADABLE:
            return self._fail("unreadable snapshot and no snapshot provider")
        result = Reservation(_CODES[code], taken, available, held, then_reply)
        if taken:
            hold.credits = taken
            self._on_held(taken)
        return self._count(result)

    async def _first_run(
        self,
        keys: tuple[str, ...],
        hold: Hold,
        estimate: int,
        floor: int,
        then: BusCall | None,
    ) -> tuple[Any, Any]:
        """The script, read through the cache: a blocked answer is remembered (the
        next request of this user is refused without I/O until Redis says the marker
        changed), under the cache's rules for reads that race an invalidation."""
        cache = self.guard.cache
        budget = self._budget_s
        if cache is None or not cache.live:
            return await self._run(keys, hold, estimate, floor, budget, then)
        replies: list[tuple[Any, Any]] = []

        async def read(_: Any) -> list[Any]:
            pair = await self._run(keys, hold, estimate, floor, budget, then)
            replies.append(pair)
            return [b"1" if int(pair[0][0]) == _BLOCKED else None]

        await cache.read_through((keys[1],), read)
        return replies[0]

    async def _run(
        self,
        keys: tuple[str, ...],
        hold: Hold,
        estimate: int,
        floor: int,
        budget_s: float | None = None,
        then: BusCall | None = None,
    ) -> tuple[Any, Any]:
        """The reserve script's reply, and `then`'s when it ran (chained: `chain`)."""
        arg = f"{estimate} {floor} {self._ttl_ms} {self._config.blocked_ttl_s} {hold.request_id}"
        chain = None if then is None else self._chains.get(then.script)
        if chain is None or then is None:
            return await self._reserves.call(keys, (arg,), budget_s), None
        return await chain.call(keys, (arg,), then, budget_s)

    def _user_keys(self, user: int) -> tuple[str, ...]:
        """snapshot, blocked, holds, holds total, holds expiry: the reserve script's
        KEYS (the settle script's are the last three), kept for the users seen last."""
        keys = self._key_names.get(user)
        if keys is None:
            if len(self._key_names) >= _KEYS_CACHED:
                self._key_names.clear()
            k = self._keys
            keys = self._key_names[user] = (k.snapshot(user), k.blocked(user), *k.hold_keys(user))
        return keys

    def _count(self, r: Reservation) -> Reservation:
        if r.result in (Reserved.ADMITTED, Reserved.CLAMPED, Reserved.REFUSED):
            self._on_reservation(r.result.value, 1)
        return r

    def _fail(self, reason: str) -> Reservation:
        closed = self._config.fail is FailPolicy.CLOSED
        self._log.warning(f"credit guard failing {'closed' if closed else 'open'}: {reason}")
        return Reservation(Reserved.UNAVAILABLE if closed else Reserved.FAIL_OPEN)

    def settle(self, hold: Hold, credits: int) -> None:
        """Rewrite the hold to `credits` (0: release it), in the background: the
        answer does not wait for it. Runs once per hold."""
        if hold.settled:
            return
        hold.settled = True
        if hold.credits:
            self._on_held(-hold.credits)
        self._settles.post(
            list(self._user_keys(hold.user_id)[2:]),
            [f"{max(credits, 0)} {self._ttl_ms} {hold.request_id}"],
            self._settled,
        )

    def _settled(self, reply: Any) -> None:
        # An error (not CancelledError: the guard is closing): the hold keeps its
        # admission value until it expires, the safe side.
        if isinstance(reply, Exception):
            self._log.warning(f"credit guard: settling a hold failed ({type(reply).__name__})")

    async def close(self) -> None:
        """Let pending settlements finish (briefly), then close the guard."""
        await self._bus.aclose(self._config.provider_timeout_s)
        if self._own_bus:
            await self._bus.close(0)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self._config.provider_timeout_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.guard.close()
