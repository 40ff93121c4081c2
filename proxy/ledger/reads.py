"""The read side of the ledger: an account, its paged history, consumption by period
(from the hourly rollups; the breakdown by endpoint from the charge entries, which
carry it), and every balance (projection)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from proxy.contract.charge_event import DEFAULT_ENDPOINT
from proxy.contract.payers import check_user_id
from proxy.ledger.schema import accounts, entries, usage_hourly

PERIODS: Final = {
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "all": None,
}
MAX_PAGE: Final = 1000


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back what it stored: UTC without offset
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Account:
    user_id: int
    balance: int  # 0 for a user the ledger never saw
    lifetime_charged: int
    lifetime_granted: int
    updated_at: str | None

    @property
    def is_blocked(self) -> bool:
        return self.balance <= 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "balance": self.balance,
            "is_blocked": self.is_blocked,
            "lifetime_charged": self.lifetime_charged,
            "lifetime_granted": self.lifetime_granted,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    kind: str
    amount: int  # signed: a charge is negative
    balance_after: int
    event_id: str
    request_id: str | None
    alias: str | None
    scene: str | None
    reason: str | None
    tokens: tuple[int, int, int, int]  # prompt, completion, cached, reasoning
    occurred_at: str | None
    applied_at: str | None
    endpoint: str | None = None  # a charge's API; None for grants and adjustments

    def as_dict(self) -> dict[str, Any]:
        p, c, cached, reasoning = self.tokens
        return {
            "id": self.id,
            "kind": self.kind,
            "amount": self.amount,
            "balance_after": self.balance_after,
            "event_id": self.event_id,
            "request_id": self.request_id,
            "alias": self.alias,
            "scene": self.scene,
            "reason": self.reason,
            "tokens": {"prompt": p, "completion": c, "cached": cached, "reasoning": reasoning},
            "occurred_at": self.occurred_at,
            "applied_at": self.applied_at,
            "endpoint": self.endpoint,
        }


@dataclass(frozen=True, slots=True)
class Page:
    entries: tuple[Entry, ...]
    next_cursor: str | None  # None: this was the oldest page

    def as_dict(self) -> dict[str, Any]:
        return {"entries": [e.as_dict() for e in self.entries], "next_cursor": self.next_cursor}


def usage_totals(row: Any) -> dict[str, Any]:
    """(credits, requests, prompt, completion, cached, reasoning) as the usage JSON."""
    credits, requests, prompt, completion, cached, reasoning = (int(v or 0) for v in row)
    return {
        "credits": credits,
        "requests": requests,
        "tokens": {
            "prompt": prompt,
            "completion": completion,
            "cached": cached,
            "reasoning": reasoning,
            "total": prompt + completion,
        },
    }


class Reader:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def account(self, user_id: int) -> Account:
        check_user_id(user_id)
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(accounts).where(accounts.c.user_id == user_id))
            ).first()
        if row is None:
            return Account(user_id, 0, 0, 0, None)
        return Account(
            user_id, row.balance, row.lifetime_charged, row.lifetime_granted, _iso(row.updated_at)
        )

    async def history(self, user_id: int, limit: int = 20, cursor: str | None = None) -> Page:
        """Newest first; `cursor` is the `next_cursor` of the previous page."""
        check_user_id(user_id)
        if not 0 < limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1..{MAX_PAGE}, got {limit}")
        query = select(entries).where(entries.c.user_id == user_id)
        if cursor is not None:
            if not cursor.isdigit():
                raise ValueError(f"not a cursor: {cursor!r}")
            query = query.where(entries.c.id < int(cursor))
        query = query.order_by(entries.c.id.desc()).limit(limit + 1)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        page = tuple(_entry(r) for r in rows[:limit])
        more = len(rows) > limit
        return Page(page, str(page[-1].id) if more else None)

    async def usage(self, user_id: int, period: str, now: datetime | None = None) -> dict[str, Any]:
        """Totals and the breakdown by alias, by scene and by endpoint over `period`
        (PERIODS): the hours whose start lies within the period before `now`, this
        one included (by endpoint: the charges of those hours)."""
        check_user_id(user_id)
        if period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
        span = PERIODS[period]
        u = usage_hourly.c
        sums = [
            func.sum(u.credits),
            func.sum(u.requests),
            func.sum(u.prompt),
            func.sum(u.completion),
            func.sum(u.cached),
            func.sum(u.reasoning),
        ]
        where = [u.user_id == user_id]
        e = entries.c
        charges: list[ColumnElement[bool]] = [e.user_id == user_id, e.kind == "charge"]
        if span is not None:
            since = (now or datetime.now(UTC)) - span
            where.append(u.hour > since)
            # The same hours as the rollups: those starting after `since`.
            first = since.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
            charges.append(e.occurred_at >= first)
        endpoint = func.coalesce(e.endpoint, DEFAULT_ENDPOINT)
        by_charge = [
            -func.sum(e.amount),
            func.count(),
            func.sum(e.prompt_tokens),
            func.sum(e.completion_tokens),
            func.sum(e.cached_tokens),
            func.sum(e.reasoning_tokens),
        ]
        async with self._engine.connect() as conn:
            total = (await conn.execute(select(*sums).where(*where))).one()
            by_alias = (
                await conn.execute(select(u.alias, *sums).where(*where).group_by(u.alias))
            ).all()
            by_scene = (
                await conn.execute(select(u.scene, *sums).where(*where).group_by(u.scene))
            ).all()
            by_endpoint = (
                await conn.execute(select(endpoint, *by_charge).where(*charges).group_by(endpoint))
            ).all()
        return {
            "user_id": user_id,
            "period": period,
            **usage_totals(total),
            "by_alias": {r[0]: usage_totals(r[1:]) for r in by_alias},
            "by_scene": {r[0]: usage_totals(r[1:]) for r in by_scene},
            "by_endpoint": {r[0]: usage_totals(r[1:]) for r in by_endpoint},
        }

    async def balances(self, page: int = 1000) -> AsyncIterator[list[tuple[int, int]]]:
        """Every (user_id, balance), in pages of `page` users."""
        after = -1
        while True:
            async with self._engine.connect() as conn:
                rows = (
                    await conn.execute(
                        select(accounts.c.user_id, accounts.c.balance)
                        .where(accounts.c.user_id > after)
                        .order_by(accounts.c.user_id)
                        .limit(page)
                    )
                ).all()
            if not rows:
                return
            yield [(int(r[0]), int(r[1])) for r in rows]
            after = int(rows[-1][0])


def _entry(r: Any) -> Entry:
    return Entry(
        id=r.id,
        kind=r.kind,
        amount=r.amount,
        balance_after=r.balance_after,
        event_id=r.event_id,
        request_id=r.request_id,
        alias=r.alias,
        scene=r.scene,
        reason=r.reason,
        tokens=(r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.reasoning_tokens),
        occurred_at=_iso(r.occurred_at),
        applied_at=_iso(r.applied_at),
        endpoint=r.endpoint,
    )
