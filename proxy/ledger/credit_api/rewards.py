"""Reward rules (`rewards:` in the YAML): a service grants a rule's credits to a user
for a `reference` (a sign-up id, a check-in date), idempotently on (rule, user,
reference), within the rule's limit (`once_per_user`, or `max_per_day` per UTC day).

The limit is a set of slots, each a UNIQUE row: `once`, or `<day>#1..#N`. A grant
takes the first free slot with INSERT … ON CONFLICT DO NOTHING, so two requests
racing for the last slot cannot both win, on PostgreSQL as on SQLite, without a
lock. The credits go through the ledger's idempotent grant
(`grant:reward:<rule>:<user>:<reference>`), so a retry after a crash between the
two steps grants once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.config.store import RewardRule
from proxy.ledger.book import Book, grant
from proxy.ledger.schema import reward_grants

REFERENCE_RE: Final = re.compile(r"[\x21-\x7e]{1,128}")


class RewardLimitReached(Exception):
    pass


@dataclass(frozen=True, slots=True)
class RewardGrant:
    rule_id: str
    user_id: int
    reference: str
    credits: int
    granted: bool  # False: this (rule, user, reference) was granted before
    balance: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule_id": self.rule_id,
            "user_id": self.user_id,
            "reference": self.reference,
            "credits": self.credits,
            "granted": self.granted,
            "balance": self.balance,
        }


def _slots(rule: RewardRule, now: datetime) -> list[str]:
    if rule.once_per_user:
        return ["once"]
    day = now.astimezone(UTC).date().isoformat()
    return [f"{day}#{n}" for n in range(1, (rule.max_per_day or 0) + 1)]


class Rewards:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._book = Book(engine)
        self._insert: Any = (
            postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        )

    async def grant(
        self, rule: RewardRule, user_id: int, reference: str, now: datetime | None = None
    ) -> RewardGrant:
        now = now or datetime.now(UTC)
        credits = await self._recorded(rule, user_id, reference)
        if credits is None:
            credits = await self._take_slot(rule, user_id, reference, now)
        change = await grant(
            self._book,
            user_id,
            credits,
            f"reward:{rule.id}:{user_id}:{reference}",
            reason=f"reward {rule.id} ({reference})",
        )
        return RewardGrant(rule.id, user_id, reference, credits, change.applied, change.balance)

    async def _recorded(self, rule: RewardRule, user_id: int, reference: str) -> int | None:
        r = reward_grants.c
        async with self._engine.connect() as conn:
            return (
                await conn.execute(
                    select(r.credits).where(
                        r.rule_id == rule.id, r.user_id == user_id, r.reference == reference
                    )
                )
            ).scalar()

    async def _take_slot(
        self, rule: RewardRule, user_id: int, reference: str, now: datetime
    ) -> int:
        for slot in _slots(rule, now):
            async with self._engine.begin() as conn:
                won = (
                    await conn.execute(
                        self._insert(reward_grants)
                        .values(
                            rule_id=rule.id,
                            user_id=user_id,
                            reference=reference,
                            slot=slot,
                            credits=rule.credits,
                            granted_at=now,
                        )
                        .on_conflict_do_nothing()
                        .returning(reward_grants.c.id)
                    )
                ).first()
            if won is not None:
                return rule.credits
            recorded = await self._recorded(rule, user_id, reference)
            if recorded is not None:  # the same reference, granted concurrently
                return recorded
        raise RewardLimitReached(
            f"reward {rule.id!r} was already granted to user {user_id}"
            + (" (once per user)" if rule.once_per_user else f" {rule.max_per_day}x today")
        )
