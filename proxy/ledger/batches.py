"""Applying a batch so that one bad event cannot hold up the others: what the Kafka
consumer and the embedded sink share.

The batch goes in one transaction. Should the database refuse it for something in
the data (not a failure of the database itself, which is raised for the caller to
retry), the events are applied one by one and each refused one is reported with
the reason, for the dead-letter queue.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from proxy.contract.charge_event import ChargeEvent
from proxy.ledger.book import Book
from proxy.ledger.database import is_transient

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Applied:
    applied: int = 0
    duplicates: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # event_id -> reason
    balances: dict[int, int] = field(default_factory=dict)  # every user of the batch


async def apply_isolating(book: Book, events: Sequence[ChargeEvent]) -> Applied:
    """Raises only transient database errors (retry the whole call: what was
    applied meanwhile is a duplicate then)."""
    try:
        result = await book.apply_charges(events)
    except SQLAlchemyError as exc:
        if is_transient(exc):
            raise
        if len(events) == 1:
            return Applied(refused={events[0].event_id: f"the database refused it: {_why(exc)}"})
        log.warning("ledger: batch of %d refused (%s); applying one by one", len(events), exc)
        return await _one_by_one(book, events)
    return Applied(result.applied, result.duplicates, dict(result.rejected), dict(result.balances))


async def _one_by_one(book: Book, events: Sequence[ChargeEvent]) -> Applied:
    applied = duplicates = 0
    refused: dict[str, str] = {}
    balances: dict[int, int] = {}
    for event in events:
        part = await apply_isolating(book, [event])
        applied += part.applied
        duplicates += part.duplicates
        refused.update(part.refused)
        balances.update(part.balances)
    return Applied(applied, duplicates, refused, balances)


def _why(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:300]
