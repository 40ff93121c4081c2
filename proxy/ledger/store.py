"""The reference credit store in Redis: key layout, grants, balance and ledger reads.

The balance key is the authority; the snapshot and blocked keys are *derived* views
the proxy's guard reads, rewritten in the same Lua script as every balance change so
they can never disagree with it for longer than one script run. Charges are applied
by `proxy.ledger.consumer` (one Lua script per event); grants live here.

Keys: proxy/contract/redis_keys.py. The balance is absent = 0; the ledger stream holds
entries kind=charge|grant, amount, balance_after, event_id (charge) or reason (grant),
request_id, at; the applied marker's value is the balance after the event, its TTL the
dedup window; blocked is set when balance <= 0 and deleted by a grant that brings the
balance above 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from proxy.contract.payers import check_user_id
from proxy.contract.redis_keys import DEFAULT_PREFIX, SNAPSHOT_LUA, RedisKeys
from proxy.contract.timestamps import utc_now_iso

DEFAULT_STREAM_MAXLEN = 10_000
DEFAULT_APPLIED_TTL_S = 7 * 24 * 3600
# 0 = the blocked key set by the ledger has no TTL: the balance is authoritative and
# only a grant can make it positive again, so an expiring block would only let a
# user in until the guard re-reads the (still negative) snapshot.
DEFAULT_BLOCKED_TTL_S = 0


# KEYS: balance, ledger, snapshot, blocked, applied (or '' when no grant id)
# ARGV: amount, reason, now, maxlen, applied_ttl, grant_id ('' = not idempotent),
#       blocked_ttl
# Returns {applied (1/0), balance}.
GRANT_LUA = (
    """
if ARGV[6] ~= '' and redis.call('EXISTS', KEYS[5]) == 1 then
  return {0, tonumber(redis.call('GET', KEYS[1]) or '0')}
end
local bal = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'kind', 'grant',
  'amount', ARGV[1], 'balance_after', bal, 'reason', ARGV[2], 'grant_id', ARGV[6],
  'at', ARGV[3])
"""
    + SNAPSHOT_LUA
    + """
if bal > 0 then
  redis.call('DEL', KEYS[4])
elseif tonumber(ARGV[7]) > 0 then
  redis.call('SET', KEYS[4], 'balance', 'EX', ARGV[7])
else
  redis.call('SET', KEYS[4], 'balance')
end
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[5], bal, 'EX', ARGV[5])
end
return {1, bal}
"""
)


@dataclass(frozen=True, slots=True)
class BalanceChange:
    applied: bool  # False = a duplicate (same event/grant id seen within the window)
    balance: int  # the balance after the change (current balance for a duplicate)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: str  # stream id, "<ms>-<seq>"
    kind: str  # "charge" | "grant"
    amount: int
    balance_after: int
    at: str
    event_id: str | None = None
    request_id: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "amount": self.amount,
            "balance_after": self.balance_after,
            "at": self.at,
            "event_id": self.event_id,
            "request_id": self.request_id,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class CreditState:
    user_id: int
    balance: int
    blocked: bool
    blocked_ttl_s: int | None  # None = blocked without expiry (or not blocked)
    snapshot: str | None  # raw snapshot JSON as the guard sees it
    entries: tuple[LedgerEntry, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "balance": self.balance,
            "blocked": self.blocked,
            "blocked_ttl_s": self.blocked_ttl_s,
            "snapshot": self.snapshot,
            "entries": [e.as_dict() for e in self.entries],
        }


def check_limits(stream_maxlen: int, applied_ttl_s: int, blocked_ttl_s: int) -> None:
    """Redis rejects EX 0 and MAXLEN 0 would empty the ledger: refuse such settings
    at start-up, not in a retry loop on the first event."""
    if applied_ttl_s <= 0 or stream_maxlen <= 0 or blocked_ttl_s < 0:
        raise ValueError("applied_ttl_s and stream_maxlen must be > 0, blocked_ttl_s >= 0")


class LedgerWriter:
    """What every writer of the ledger shares: the key layout, the limits each of its
    Lua scripts is given, and the script itself (`SCRIPT` of the subclass)."""

    SCRIPT = ""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
        applied_ttl_s: int = DEFAULT_APPLIED_TTL_S,
        blocked_ttl_s: int = DEFAULT_BLOCKED_TTL_S,
    ) -> None:
        check_limits(stream_maxlen, applied_ttl_s, blocked_ttl_s)
        self._redis = redis
        self.keys = RedisKeys(prefix)
        self._stream_maxlen = stream_maxlen
        self._applied_ttl_s = applied_ttl_s
        self._blocked_ttl_s = blocked_ttl_s
        self._script = redis.register_script(self.SCRIPT)


class CreditStore(LedgerWriter):
    """Grants and reads against one Redis; owned by the CLI or a test."""

    SCRIPT = GRANT_LUA

    async def grant(
        self, user_id: int, amount: int, *, reason: str = "", grant_id: str | None = None
    ) -> BalanceChange:
        """Add `amount` (> 0) credits; unblocks the user once the balance is positive.

        With `grant_id` the grant is idempotent within the applied-marker window
        (e.g. a payment webhook retried by its sender).
        """
        check_user_id(user_id)
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise ValueError(f"amount must be a positive integer, got {amount!r}")
        k = self.keys
        applied_key = k.applied(f"grant:{grant_id}") if grant_id else k.applied("grant:-")
        res = await self._script(
            keys=[
                k.balance(user_id),
                k.ledger(user_id),
                k.snapshot(user_id),
                k.blocked(user_id),
                applied_key,
            ],
            args=[
                amount,
                reason,
                utc_now_iso(),
                self._stream_maxlen,
                self._applied_ttl_s,
                grant_id or "",
                self._blocked_ttl_s,
            ],
        )
        return BalanceChange(applied=bool(res[0]), balance=int(res[1]))

    async def balance(self, user_id: int) -> int:
        check_user_id(user_id)
        raw = await self._redis.get(self.keys.balance(user_id))
        return int(raw) if raw is not None else 0

    async def entries(self, user_id: int, limit: int = 20) -> tuple[LedgerEntry, ...]:
        """Newest first."""
        check_user_id(user_id)
        if limit <= 0:
            return ()
        rows: Any = await self._redis.xrevrange(self.keys.ledger(user_id), count=limit)
        return tuple(_entry(sid, fields) for sid, fields in rows)

    async def show(self, user_id: int, limit: int = 5) -> CreditState:
        check_user_id(user_id)
        k = self.keys
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(k.balance(user_id))
            pipe.ttl(k.blocked(user_id))
            pipe.get(k.snapshot(user_id))
            pipe.xrevrange(k.ledger(user_id), count=max(limit, 0) or 1)
            raw_balance, ttl, snapshot, rows = await pipe.execute()
        # TTL: -2 = no key, -1 = no expiry.
        blocked = ttl != -2
        return CreditState(
            user_id=user_id,
            balance=int(raw_balance) if raw_balance is not None else 0,
            blocked=blocked,
            blocked_ttl_s=ttl if ttl >= 0 else None,
            snapshot=_text(snapshot),
            entries=tuple(_entry(sid, f) for sid, f in rows[: max(limit, 0)]),
        )


def _text(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else raw


def _entry(stream_id: bytes | str, fields: dict[Any, Any]) -> LedgerEntry:
    f = {_text(key): _text(value) for key, value in fields.items()}
    return LedgerEntry(
        id=_text(stream_id) or "",
        kind=f.get("kind") or "",
        amount=int(f.get("amount") or 0),
        balance_after=int(f.get("balance_after") or 0),
        at=f.get("at") or "",
        event_id=f.get("event_id") or None,
        request_id=f.get("request_id") or None,
        reason=f.get("reason") or None,
    )
