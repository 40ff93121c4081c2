"""Rate limits per user and per caller key, shared by every replica through Redis.

Requests and tokens per minute are token buckets (capacity = the per-minute limit,
refilled continuously); concurrency is a set of request ids whose entries expire
(`slot_ttl_s`), so a proxy that died never holds a slot forever. Each request runs
ONE script to admit (all of its keys share the user's hash tag: valid on a
cluster) and, when it holds something to give back, one to finish: its slots
released and its token estimate corrected with the actual usage.

`limits.key` counts per (caller key, user): the keys of one request must share one
slot, and a user's key is that user's anyway; a service key acting for many users
is limited per user it acts for.

Redis unreachable or slower than `budget_ms`: admitted (fail open, counted and
logged), or refused with 503 when `fail_open: false`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from proxy.billing.estimate import output_allowance, prompt_bound
from proxy.billing.payer import BillingContext
from proxy.billing.record import ChatRequest
from proxy.billing.script_batcher import BusCall, BusScript, ScriptBus
from proxy.config.model import LimitsConfig, LimitSet
from proxy.contract.records import record
from proxy.contract.redis_keys import RedisKeys
from proxy.logs import ThrottledLog

log = logging.getLogger(__name__)

# Decisions (the `result` label of llm_proxy_rate_limit_decisions_total).
ALLOW, LIMITED, FAIL_OPEN, FAIL_CLOSED = "allow", "limited", "fail_open", "fail_closed"
DECISIONS = (ALLOW, LIMITED, FAIL_OPEN, FAIL_CLOSED)
NONE = -1  # "no limit" on the wire of the scripts and in overrides
# The dimensions in script order (KEYS[2..7], ARGV[1..6]).
DIMENSIONS = ("user rpm", "user tpm", "user concurrency", "key rpm", "key tpm", "key concurrency")


def admission_tokens(chat: ChatRequest, prompt: int | None = None) -> int:
    """The tokens a request is admitted on (TPM) before its usage is known: the
    reservation's estimate (proxy.billing.estimate: the prompt's byte bound plus the
    output allowance, the alias's `reserve_output_tokens` when the request names no
    limit); corrected with the actual usage when the request ends."""
    if prompt is None:  # the reservation computed it already in guard.mode reserve
        prompt = prompt_bound(chat)
    return prompt + output_allowance(chat, chat.alias.reserve_output_tokens)[0]


# KEYS: override, user rpm, user tpm, user conc, key rpm, key tpm, key conc
# ARGV[1]: "<six limits (-1: none)> <tokens> <slot ttl ms> <read override 1/0>
# <request id>" (one argument: each one more is packing and parsing on both sides).
# Returns {refused dimension (0: admitted), retry after ms, then for the headers the
# tighter of the user's and the key's requests and tokens limits: limit, remaining
# (floored; -1: no limit), reset ms; then the user's and the key's tokens caps in
# force, and 1 when a concurrency slot is held}.
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local W = 60000
local a1, a2, a3, a4, a5, a6, tk, tl, ro, rid = string.match(ARGV[1],
  '^(%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%-?%d+) (%d+) (%d+) ([01]) (.*)$')
local lim = {tonumber(a1), tonumber(a2), tonumber(a3), tonumber(a4), tonumber(a5), tonumber(a6)}
if ro == '1' then
  local o = redis.call('HMGET', KEYS[1], 'rpm', 'tpm', 'concurrency')
  for i = 1, 3 do
    if o[i] then lim[i] = tonumber(o[i]) end
  end
end
local tokens = tonumber(tk)
local ttl = tonumber(tl)
local cost = {1, tokens, 1, 1, tokens, 1}
local level = {}
local refused, retry = 0, 0
for i = 1, 6 do
  level[i] = -1
  local cap = lim[i]
  if cap >= 0 then
    local key = KEYS[i + 1]
    local need = cost[i]
    local lv
    if i == 3 or i == 6 then
      -- expired slots (of a proxy that died) are purged only when they could
      -- matter: below the limit with them counted, it is below without them
      lv = cap - redis.call('ZCARD', key)
      if lv < 1 then
        redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
        lv = cap - redis.call('ZCARD', key)
      end
      if lv < 1 then
        if refused == 0 then refused = i end
        if retry < 1000 then retry = 1000 end
      end
    else
      local h = redis.call('HMGET', key, 'v', 't')
      lv = cap
      if h[1] and h[2] then
        lv = tonumber(h[1]) + (now - tonumber(h[2])) * cap / W
        if lv > cap then lv = cap end
      end
      if need > cap then need = cap end
      if cap == 0 or lv < need then
        if refused == 0 then refused = i end
        local wait = W
        if cap > 0 then wait = math.ceil((need - lv) * W / cap) end
        if wait > retry then retry = wait end
      end
    end
    level[i] = lv
  end
end
if refused == 0 then
  for i = 1, 6 do
    local cap = lim[i]
    if cap >= 0 then
      local key = KEYS[i + 1]
      level[i] = level[i] - cost[i]
      if i == 3 or i == 6 then
        redis.call('ZADD', key, now + ttl, rid)
        redis.call('PEXPIRE', key, ttl)
      else
        redis.call('HSET', key, 'v', tostring(level[i]), 't', now)
        redis.call('PEXPIRE', key, math.ceil((cap - level[i]) * W / math.max(cap, 1)) + 1000)
      end
    end
  end
end
local out = {refused, retry}
for _, d in ipairs({{1, 4}, {2, 5}}) do
  -- the tighter of the two: the lower remaining level (the user's on a tie)
  local best, rem = nil, 0
  for _, i in ipairs(d) do
    if lim[i] >= 0 then
      local lv = math.floor(math.max(level[i], 0))
      if best == nil or lv < rem then best, rem = i, lv end
    end
  end
  if best == nil then
    out[#out + 1], out[#out + 2], out[#out + 3] = -1, -1, 0
  else
    local r = 0
    if lim[best] > 0 and level[best] < lim[best] then
      r = math.ceil((lim[best] - level[best]) * W / lim[best])
    end
    out[#out + 1], out[#out + 2], out[#out + 3] = lim[best], rem, r
  end
end
out[#out + 1] = lim[2]
out[#out + 1] = lim[5]
if lim[3] >= 0 or lim[6] >= 0 then out[#out + 1] = 1 else out[#out + 1] = 0 end
return out
"""

# KEYS: user tpm, key tpm, user conc, key conc
# ARGV[1]: "<tokens to give back (negative: owed)> <user tpm cap> <key tpm cap>
# <request id>"
_FINISH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local W = 60000
local d, c1, c2, rid = string.match(ARGV[1], '^(%-?%d+) (%-?%d+) (%-?%d+) (.*)$')
local delta = tonumber(d)
local caps = {tonumber(c1), tonumber(c2)}
for i = 1, 2 do
  local cap = caps[i]
  if cap > 0 and delta ~= 0 then
    local h = redis.call('HMGET', KEYS[i], 'v', 't')
    if h[1] and h[2] then
      local lv = tonumber(h[1]) + (now - tonumber(h[2])) * cap / W
      if lv > cap then lv = cap end
      lv = lv + delta
      if lv > cap then lv = cap end
      redis.call('HSET', KEYS[i], 'v', tostring(lv), 't', now)
      redis.call('PEXPIRE', KEYS[i], math.ceil((cap - lv) * W / cap) + 1000)
    end
  end
end
redis.call('ZREM', KEYS[3], rid)
redis.call('ZREM', KEYS[4], rid)
return 1
"""


def format_reset(ms: int) -> str:
    """OpenAI's spelling of a reset time: "20ms", "1s", "6m0s", "1h2m3s"."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    s = -(-ms // 1000)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


@record
class Admission:
    """One request's rate-limit decision and what finishing it needs."""

    result: str  # one of DECISIONS
    headers: dict[str, str]  # the x-ratelimit-* headers (empty when not known)
    refused: str | None = None  # the dimension over its limit (DIMENSIONS)
    retry_after_s: int = 0
    # For `finish`: the keys, the token caps in force, the tokens admitted on.
    keys: tuple[str, ...] = ()
    tpm_caps: tuple[int, int] = (NONE, NONE)
    tokens: int = 0
    holds_slot: bool = False


def _headers(r: list[Any]) -> dict[str, str]:
    """From the script's reply: the tighter of the user's and the key's limits."""
    out: dict[str, str] = {}
    if r[2] >= 0:
        out["x-ratelimit-limit-requests"] = str(r[2])
        out["x-ratelimit-remaining-requests"] = str(r[3])
        out["x-ratelimit-reset-requests"] = format_reset(r[4])
    if r[5] >= 0:
        out["x-ratelimit-limit-tokens"] = str(r[5])
        out["x-ratelimit-remaining-tokens"] = str(r[6])
        out["x-ratelimit-reset-tokens"] = format_reset(r[7])
    return out


def _wire(s: LimitSet) -> list[int]:
    return [NONE if v is None else v for v in (s.rpm, s.tpm, s.concurrency)]


_KEYS_CACHED = 4096  # (user, caller key) pairs whose Redis key names are kept


class RateLimiter:
    def __init__(
        self,
        redis: aioredis.Redis | RedisCluster,
        config: LimitsConfig,
        prefix: str,
        on_decision: Callable[[str], None] = lambda _: None,
        bus: ScriptBus | None = None,
    ) -> None:
        self._config = config
        self._keys = RedisKeys(prefix)
        self._budget_s = config.budget_ms / 1000
        self._fail_log = ThrottledLog(log, config.fail_log_interval_s)
        # The limits' part of the admit script's argument, built once.
        user, key = _wire(config.user), _wire(config.key)
        self._wire_user = " ".join(map(str, user + key))
        self._wire_key_only = " ".join(map(str, [NONE] * 3 + key))
        self._wire_tail = str(int(config.slot_ttl_s * 1000))
        self._key_names: dict[tuple[int, str], tuple[str, ...]] = {}
        self._on_decision = on_decision
        # One command per loop tick for the scripts of the Redis client's bus
        # (shared with the reservations': proxy/billing/script_batcher.py).
        send_timeout = max(1.0, self._budget_s * 10)
        self._own_bus = bus is None
        self._bus = bus = bus if bus is not None else ScriptBus(redis)
        self._admits = bus.register(_ADMIT_LUA, send_timeout, self._admitted_orphan)
        self._finishes = bus.register(_FINISH_LUA, send_timeout)

    @property
    def config(self) -> LimitsConfig:
        return self._config

    @property
    def pending(self) -> int:
        """Scripts queued or in flight (tests wait for 0)."""
        return self._bus.pending

    def keys_for(self, ctx: BillingContext) -> tuple[str, ...]:
        pair = (ctx.user_id, ctx.principal)
        keys = self._key_names.get(pair)
        if keys is None:
            if len(self._key_names) >= _KEYS_CACHED:
                self._key_names.clear()
            uid = ctx.user_id
            key_scope = f"key:{ctx.principal}"
            k = self._keys
            keys = self._key_names[pair] = (
                k.limits_override(uid),
                k.limit(uid, "user", "rpm"),
                k.limit(uid, "user", "tpm"),
                k.limit(uid, "user", "conc"),
                k.limit(uid, key_scope, "rpm"),
                k.limit(uid, key_scope, "tpm"),
                k.limit(uid, key_scope, "conc"),
            )
        return keys

    @property
    def admit_script(self) -> BusScript:
        """The admission script (a reservation may run its calls: `admit_call`)."""
        return self._admits

    def admit_call(self, ctx: BillingContext, tokens: int, request_id: str) -> BusCall:
        """The admission's script call, for `decide` with its reply (made here by
        `admit`, or chained to the reservation's call by proxy.billing.admission)."""
        # "<six limits> <tokens> <slot ttl ms> <read override>" + request id (_ADMIT_LUA)
        if ctx.user_id > 0:
            arg = f"{self._wire_user} {tokens} {self._wire_tail} 1 {request_id}"
        else:  # nobody to limit as a user: only the key's limits apply
            arg = f"{self._wire_key_only} {tokens} {self._wire_tail} 0 {request_id}"
        return BusCall(self._admits, self.keys_for(ctx), (arg,))

    async def admit(self, ctx: BillingContext, tokens: int, request_id: str) -> Admission:
        call = self.admit_call(ctx, tokens, request_id)
        try:
            reply = await self._admits.call(call.keys, call.args, self._budget_s)
        except TimeoutError:
            return self._failed(f"check exceeded its {self._config.budget_ms:g} ms budget")
        except (RedisError, OSError) as exc:
            return self._failed(f"Redis error {type(exc).__name__}")
        return self.decide(call, tokens, reply)

    def decide(self, call: BusCall, tokens: int, reply: Any) -> Admission:
        """The admission that `call`'s reply says (an error reply: failed, per
        `fail_open`), counted."""
        if isinstance(reply, BaseException):
            return self._failed(f"Redis error {type(reply).__name__}")
        headers = _headers(reply)
        refused = reply[0]
        if refused:
            self._on_decision(LIMITED)
            retry_s = max(1, -(-reply[1] // 1000))
            return Admission(LIMITED, headers, DIMENSIONS[refused - 1], retry_s)
        self._on_decision(ALLOW)
        return Admission(
            ALLOW,
            headers,
            keys=tuple(call.keys),
            tpm_caps=(reply[8], reply[9]),
            tokens=tokens,
            holds_slot=reply[10] == 1,
        )

    def _failed(self, reason: str) -> Admission:
        result = FAIL_OPEN if self._config.fail_open else FAIL_CLOSED
        self._on_decision(result)
        verdict = "admitting" if result == FAIL_OPEN else "refusing"
        self._fail_log.warning(f"rate limiter {verdict} (fail {result[5:]}): {reason}")
        return Admission(result, {})

    def finish(self, admission: Admission, actual_tokens: int, request_id: str) -> None:
        """The request ended (however): release its slots and correct its token
        estimate with `actual_tokens`. Runs in the background; a slot it fails to
        release expires after `slot_ttl_s`."""
        if admission.result != ALLOW:
            return
        counts_tokens = any(c > 0 for c in admission.tpm_caps)
        delta = admission.tokens - actual_tokens if counts_tokens else 0
        if not delta and not admission.holds_slot:
            return
        k = admission.keys
        user_cap, key_cap = admission.tpm_caps
        self._finish([k[2], k[5], k[3], k[6]], [f"{delta} {user_cap} {key_cap} {request_id}"])

    def _admitted_orphan(self, call: tuple[list[Any], list[Any]], result: Any) -> None:
        """An admit whose caller gave up (its budget, the client leaving) but that
        Redis ran: whatever it admitted is given back at once."""
        if isinstance(result, BaseException) or result[0] != 0:
            return
        keys, args = call
        wire = args[0].split(" ", 9)  # six limits, tokens, ttl, override, request id
        self._finish(
            [keys[2], keys[5], keys[3], keys[6]], [f"{wire[6]} {result[8]} {result[9]} {wire[9]}"]
        )

    def _finish(self, keys: list[Any], args: list[Any]) -> None:
        self._finishes.post(keys, args, self._finished)

    def _finished(self, reply: Any) -> None:
        # An error (not CancelledError: the limiter is closing): the slot expires
        # after slot_ttl_s.
        if isinstance(reply, Exception):
            self._fail_log.warning(f"rate limiter could not finish a request: {reply!r}")

    async def close(self) -> None:
        """Let the scripts in flight end (briefly), before Redis closes."""
        await self._bus.aclose()
        if self._own_bus:
            await self._bus.close(0)


# -- per-user overrides (llm-proxy limits) -----------------------------------------


async def set_override(
    redis: aioredis.Redis, prefix: str, user_id: int, values: dict[str, int]
) -> dict[str, int]:
    """Set some of rpm/tpm/concurrency (-1: unlimited) for one user; returns them all."""
    key = RedisKeys(prefix).limits_override(user_id)
    if values:
        await redis.hset(key, mapping={k: str(v) for k, v in values.items()})
    return await get_override(redis, prefix, user_id)


async def get_override(redis: aioredis.Redis, prefix: str, user_id: int) -> dict[str, int]:
    raw = await redis.hgetall(RedisKeys(prefix).limits_override(user_id))
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in sorted(raw.items())}


async def clear_override(redis: aioredis.Redis, prefix: str, user_id: int) -> bool:
    return bool(await redis.delete(RedisKeys(prefix).limits_override(user_id)))
