"""The embedded ledger's dead letters: list them, and replay them once the cause is
fixed (`llm-proxy ledger dead-letters`, `llm-proxy ledger replay-dead-letters`).

A replay goes through the same reader and the same idempotent apply as the first
attempt: an event applied meanwhile (e.g. from an outbox re-send) is a duplicate,
an event still refused keeps its row with the new reason. A row leaves the table
only when its event is in the books. With Kafka, dead letters are records of the
`<topic>.dlq` topic instead (replayed by producing them to the charge topic again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.contract.charge_event import ChargeEvent
from proxy.ledger.batches import apply_isolating
from proxy.ledger.book import Book, check_event
from proxy.ledger.schema import dead_letters

MAX_REASON_CHARS = 1000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    reason: str
    source: str
    created_at: datetime
    size: int  # payload bytes (the payload may hold prompts' metadata: not printed)


@dataclass(frozen=True, slots=True)
class Replayed:
    applied: int
    duplicates: int
    refused: dict[int, str]  # dead-letter id -> why it is still refused
    balances: dict[int, int]  # users whose balance the replay changed


async def list_dead_letters(engine: AsyncEngine, limit: int) -> list[DeadLetter]:
    query = (
        select(
            dead_letters.c.id,
            dead_letters.c.reason,
            dead_letters.c.source,
            dead_letters.c.created_at,
            dead_letters.c.payload,
        )
        .order_by(dead_letters.c.id)
        .limit(limit)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [DeadLetter(r.id, r.reason, r.source, r.created_at, len(r.payload)) for r in rows]


async def replay(engine: AsyncEngine, ids: Sequence[int] | None = None) -> Replayed:
    """Re-apply the given dead letters (all of them when `ids` is None)."""
    query = select(dead_letters.c.id, dead_letters.c.payload).order_by(dead_letters.c.id)
    if ids is not None:
        query = query.where(dead_letters.c.id.in_(list(ids)))
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    refused: dict[int, str] = {}
    by_event: dict[str, int] = {}
    events: list[ChargeEvent] = []
    for row in rows:
        try:
            event = ChargeEvent.from_json(row.payload)
            check_event(event)
        except ValueError as exc:
            refused[row.id] = str(exc)
            continue
        if event.event_id in by_event:  # two payloads of one event: the first decides
            refused[row.id] = f"another dead letter ({by_event[event.event_id]}) has this event id"
            continue
        by_event[event.event_id] = row.id
        events.append(event)
    result = await apply_isolating(Book(engine), events)
    for event_id, why in result.refused.items():
        refused[by_event[event_id]] = why
    done = [row_id for event_id, row_id in by_event.items() if event_id not in result.refused]
    async with engine.begin() as conn:
        if done:
            await conn.execute(delete(dead_letters).where(dead_letters.c.id.in_(done)))
        for row_id, why in refused.items():
            await conn.execute(
                update(dead_letters)
                .where(dead_letters.c.id == row_id)
                .values(reason=why[:MAX_REASON_CHARS])
            )
    return Replayed(result.applied, result.duplicates, refused, dict(result.balances))
