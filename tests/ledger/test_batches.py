"""apply_isolating: an event the database refuses is reported alone, the rest apply;
a failure of the database itself is raised for a retry (real SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.contract.charge_event import ChargeEvent
from proxy.ledger.batches import apply_isolating
from proxy.ledger.book import BatchResult, Book
from proxy.ledger.reads import Reader
from tests.ledger_events import charge_event


class RefusingBook(Book):
    """The real book, except that the database refuses any batch holding `bad`."""

    def __init__(self, engine: AsyncEngine, bad: str, error: Exception) -> None:
        super().__init__(engine)
        self.bad, self.error = bad, error

    async def apply_charges(self, events: Sequence[ChargeEvent]) -> BatchResult:
        if any(e.event_id == self.bad for e in events):
            raise self.error
        return await super().apply_charges(events)


async def test_the_refused_event_is_reported_and_the_others_apply(
    ledger_engine: AsyncEngine,
) -> None:
    events = [charge_event(1, 2), charge_event(1, 3), charge_event(2, 5)]
    error = IntegrityError("INSERT", {}, Exception("duplicate key value\nDETAIL: x"))
    book = RefusingBook(ledger_engine, events[1].event_id, error)
    result = await apply_isolating(book, events)
    assert (result.applied, result.duplicates) == (2, 0)
    assert list(result.refused) == [events[1].event_id]
    assert result.refused[events[1].event_id] == "the database refused it: duplicate key value"
    assert result.balances == {1: -2, 2: -5}
    assert (await Reader(ledger_engine).account(1)).balance == -2


async def test_a_database_outage_is_raised_for_a_retry(ledger_engine: AsyncEngine) -> None:
    events = [charge_event(1, 2), charge_event(1, 3)]
    outage = OperationalError("SELECT", {}, Exception("connection refused"))
    book = RefusingBook(ledger_engine, events[0].event_id, outage)
    with pytest.raises(OperationalError):
        await apply_isolating(book, events)
    assert (await Reader(ledger_engine).account(1)).balance == 0
