"""The write side of the ledger: charges, grants and adjustments, applied to the
database of record in batches, each event id once, forever.

One transaction per batch: the accounts of the batch's users are locked once each
(in user id order, so two writers cannot deadlock), ids already in `entries` are
skipped, and the entries, the hourly usage and the balances are written together.
The UNIQUE event_id is the last word: should another writer have inserted one of
the ids anyway (the same id under another user), the transaction fails and the
caller retries it, now seeing that id as applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from proxy.contract.charge_event import ChargeEvent
from proxy.contract.payers import check_user_id
from proxy.ledger.schema import accounts, entries, usage_hourly

MAX_AMOUNT: Final = 2**63 - 1
MIN_AMOUNT: Final = -(2**63)
# Below this balance `credits adjust` refuses to go without --allow-negative: an
# operator correction should not silently put a user in debt.
ADJUST_FLOOR: Final = 0
_IN_CHUNK: Final = 500  # ids per IN (...) list; far below SQLite's parameter limit
_USAGE_COLUMNS: Final = ("credits", "requests", "prompt", "completion", "cached", "reasoning")


@dataclass(frozen=True, slots=True)
class Posting:
    """One balance change to record; `amount` is signed (a charge is negative)."""

    user_id: int
    kind: str  # charge | grant | adjustment | refund
    amount: int
    event_id: str
    occurred_at: datetime
    request_id: str | None = None
    alias: str | None = None
    scene: str | None = None
    reason: str | None = None
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    reasoning: int = 0
    endpoint: str | None = None  # a charge's API (ChargeEvent.endpoint)

    @classmethod
    def charge(cls, e: ChargeEvent) -> Posting:
        u = e.usage
        return cls(
            user_id=e.user_id,
            kind="charge",
            amount=-e.credits,
            event_id=e.event_id,
            occurred_at=datetime.fromisoformat(e.occurred_at),  # "Z": UTC (from_json checked it)
            request_id=e.request_id,
            alias=e.alias,
            scene=e.scene,
            prompt=u.prompt_tokens,
            completion=u.completion_tokens,
            cached=u.cached_tokens,
            reasoning=u.reasoning_tokens,
            endpoint=e.endpoint,
        )


@dataclass(frozen=True, slots=True)
class BatchResult:
    applied: int
    duplicates: int
    # event_id -> why it cannot be applied (the balance or a total would leave 64 bits)
    rejected: Mapping[str, str] = field(default_factory=dict)
    # Every user of the batch (duplicates too: a redelivery after a crash between
    # the commit and the projection must still refresh that user's keys).
    balances: Mapping[int, int] = field(default_factory=dict)


def check_event(event: ChargeEvent) -> None:
    """What the ledger needs beyond the schema: a billable user, 64-bit amounts and
    text a database can store. Raises ValueError (the event goes to the DLQ)."""
    check_user_id(event.user_id)
    u = event.usage
    for name, value in (
        ("credits", event.credits),
        ("usage.prompt", u.prompt_tokens),
        ("usage.completion", u.completion_tokens),
    ):
        if value > MAX_AMOUNT:
            raise ValueError(f"{name} does not fit 64 bits: {value}")
    for name, text in (
        ("request_id", event.request_id),
        ("alias", event.alias),
        ("scene", event.scene),
    ):
        if "\x00" in text:  # PostgreSQL text cannot hold NUL
            raise ValueError(f"{name} contains a NUL character")


def _fits(value: int) -> bool:
    return MIN_AMOUNT <= value <= MAX_AMOUNT


class Book:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._insert: Any = (
            postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        )

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def apply_charges(self, events: Sequence[ChargeEvent]) -> BatchResult:
        return await self.post([Posting.charge(e) for e in events])

    async def post(self, postings: Sequence[Posting], *, floor: int | None = None) -> BatchResult:
        """Apply every posting not applied before, in one transaction. With `floor`,
        a posting that would leave a balance below it raises ValueError (nothing of
        the batch is written)."""
        if not postings:
            return BatchResult(0, 0)
        async with self._engine.begin() as conn:
            return await self._post(conn, postings, floor)

    async def _post(
        self, conn: AsyncConnection, postings: Sequence[Posting], floor: int | None
    ) -> BatchResult:
        now = datetime.now(UTC)
        users = sorted({p.user_id for p in postings})
        accts = await self._lock_accounts(conn, users, now)
        seen = await self._applied_ids(conn, [p.event_id for p in postings])
        rows: list[dict[str, Any]] = []
        usage: dict[tuple[int, datetime, str, str], list[int]] = {}
        rejected: dict[str, str] = {}
        duplicates = 0
        changed: set[int] = set()
        for p in postings:
            if p.event_id in seen:
                duplicates += 1
                continue
            acct = accts[p.user_id]
            after = acct["balance"] + p.amount
            charged = acct["lifetime_charged"] + (-p.amount if p.kind == "charge" else 0)
            granted = acct["lifetime_granted"] + (p.amount if p.kind == "grant" else 0)
            if not (_fits(after) and _fits(charged) and _fits(granted)):
                rejected[p.event_id] = "the balance or a lifetime total would leave 64 bits"
                continue
            if floor is not None and p.amount < 0 and after < floor:
                raise ValueError(f"user {p.user_id}: balance would be {after}, below {floor}")
            seen.add(p.event_id)
            changed.add(p.user_id)
            acct.update(balance=after, lifetime_charged=charged, lifetime_granted=granted)
            rows.append(_entry_row(p, after, now))
            if p.kind == "charge":
                hour = p.occurred_at.replace(minute=0, second=0, microsecond=0)
                key = (p.user_id, hour, p.alias or "", p.scene or "")
                sums = usage.setdefault(key, [0] * len(_USAGE_COLUMNS))
                values = (-p.amount, 1, p.prompt, p.completion, p.cached, p.reasoning)
                for i, v in enumerate(values):
                    sums[i] += v
        if rows:
            await conn.execute(entries.insert(), rows)
            await self._add_usage(conn, usage)
            await conn.execute(
                update(accounts)
                .where(accounts.c.user_id == bindparam("uid"))
                .values(
                    balance=bindparam("bal"),
                    lifetime_charged=bindparam("charged"),
                    lifetime_granted=bindparam("granted"),
                    updated_at=now,
                ),
                [
                    {
                        "uid": u,
                        "bal": a["balance"],
                        "charged": a["lifetime_charged"],
                        "granted": a["lifetime_granted"],
                    }
                    for u, a in accts.items()
                    if u in changed
                ],
            )
        return BatchResult(
            applied=len(rows),
            duplicates=duplicates,
            rejected=rejected,
            balances={u: a["balance"] for u, a in accts.items()},
        )

    async def _lock_accounts(
        self, conn: AsyncConnection, users: list[int], now: datetime
    ) -> dict[int, dict[str, Any]]:
        new = [
            {
                "user_id": u,
                "balance": 0,
                "lifetime_charged": 0,
                "lifetime_granted": 0,
                "updated_at": now,
            }
            for u in users
        ]
        await conn.execute(
            self._insert(accounts).on_conflict_do_nothing(index_elements=["user_id"]), new
        )
        found: dict[int, dict[str, Any]] = {}
        for i in range(0, len(users), _IN_CHUNK):
            result = await conn.execute(
                select(
                    accounts.c.user_id,
                    accounts.c.balance,
                    accounts.c.lifetime_charged,
                    accounts.c.lifetime_granted,
                )
                .where(accounts.c.user_id.in_(users[i : i + _IN_CHUNK]))
                .order_by(accounts.c.user_id)
                .with_for_update()
            )
            for uid, bal, charged, granted in result:
                found[uid] = {
                    "balance": bal,
                    "lifetime_charged": charged,
                    "lifetime_granted": granted,
                }
        return found

    async def _applied_ids(self, conn: AsyncConnection, ids: list[str]) -> set[str]:
        unique = sorted(set(ids))
        seen: set[str] = set()
        for i in range(0, len(unique), _IN_CHUNK):
            result = await conn.execute(
                select(entries.c.event_id).where(entries.c.event_id.in_(unique[i : i + _IN_CHUNK]))
            )
            seen.update(result.scalars())
        return seen

    async def _add_usage(
        self, conn: AsyncConnection, usage: dict[tuple[int, datetime, str, str], list[int]]
    ) -> None:
        if not usage:
            return
        stmt = self._insert(usage_hourly)
        stmt = stmt.on_conflict_do_update(
            index_elements=["user_id", "hour", "alias", "scene"],
            set_={c: usage_hourly.c[c] + stmt.excluded[c] for c in _USAGE_COLUMNS},
        )
        await conn.execute(
            stmt,
            [
                {
                    "user_id": u,
                    "hour": h,
                    "alias": a,
                    "scene": s,
                    **dict(zip(_USAGE_COLUMNS, v, strict=True)),
                }
                for (u, h, a, s), v in sorted(usage.items())
            ],
        )


@dataclass(frozen=True, slots=True)
class Change:
    applied: bool  # False: this id was applied before (nothing changed now)
    balance: int


async def grant(book: Book, user_id: int, amount: int, key: str, reason: str = "") -> Change:
    """Add `amount` (> 0) credits once per `key` (e.g. a payment id)."""
    check_user_id(user_id)
    if not 0 < amount <= MAX_AMOUNT:
        raise ValueError(f"amount must be a positive 64-bit integer, got {amount}")
    posting = Posting(
        user_id=user_id,
        kind="grant",
        amount=amount,
        event_id=f"grant:{key}",
        occurred_at=datetime.now(UTC),
        reason=reason or None,
    )
    result = await book.post([posting])
    if result.rejected:
        raise ValueError(next(iter(result.rejected.values())))
    return Change(result.applied == 1, result.balances[user_id])


async def adjust(
    book: Book, user_id: int, amount: int, key: str, reason: str, *, allow_negative: bool = False
) -> Change:
    """An operator correction (+ or -) once per `key`; refuses to take the balance
    below ADJUST_FLOOR unless `allow_negative`."""
    check_user_id(user_id)
    if amount == 0 or not _fits(amount):
        raise ValueError(f"amount must be a non-zero 64-bit integer, got {amount}")
    if not reason:
        raise ValueError("an adjustment needs a reason")
    posting = Posting(
        user_id=user_id,
        kind="adjustment",
        amount=amount,
        event_id=f"adjust:{key}",
        occurred_at=datetime.now(UTC),
        reason=reason,
    )
    result = await book.post([posting], floor=None if allow_negative else ADJUST_FLOOR)
    if result.rejected:
        raise ValueError(next(iter(result.rejected.values())))
    return Change(result.applied == 1, result.balances[user_id])


def _entry_row(p: Posting, balance_after: int, now: datetime) -> dict[str, Any]:
    return {
        "user_id": p.user_id,
        "kind": p.kind,
        "amount": p.amount,
        "balance_after": balance_after,
        "event_id": p.event_id,
        "request_id": p.request_id,
        "alias": p.alias,
        "scene": p.scene,
        "reason": p.reason,
        "prompt_tokens": p.prompt,
        "completion_tokens": p.completion,
        "cached_tokens": p.cached,
        "reasoning_tokens": p.reasoning,
        "occurred_at": p.occurred_at,
        "applied_at": now,
        "endpoint": p.endpoint,
    }
