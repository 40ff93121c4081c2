"""The database of record (real SQLite and PostgreSQL): charges, grants, adjustments,
idempotency forever, history pages, usage by period from the rollups, migrations."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.errors import LedgerNotMigrated
from proxy.ledger.book import MAX_AMOUNT, Book, adjust, grant
from proxy.ledger.database import migrate, open_engine, require_migrated
from proxy.ledger.reads import Reader
from proxy.ledger.schema import SCHEMA_VERSION, entries
from tests.ledger_events import charge_event, random_charges


@pytest.fixture
def book(ledger_engine: AsyncEngine) -> Book:
    return Book(ledger_engine)


@pytest.fixture
def reader(ledger_engine: AsyncEngine) -> Reader:
    return Reader(ledger_engine)


async def test_unmigrated_database_is_refused_then_migrate_is_idempotent(ledger_url: str) -> None:
    engine = open_engine(ledger_url)
    try:
        with pytest.raises(LedgerNotMigrated, match="llm-proxy ledger migrate"):
            await require_migrated(engine)
        assert await migrate(engine) == (0, SCHEMA_VERSION)
        assert await migrate(engine) == (SCHEMA_VERSION, SCHEMA_VERSION)
        await require_migrated(engine)
    finally:
        await engine.dispose()


async def test_balance_history_and_usage_equal_the_sum_of_events(
    book: Book, reader: Reader
) -> None:
    users = [1, 2, 3]
    for u in users:
        assert (await grant(book, u, 1000, f"welcome-{u}")).applied
    events = random_charges(300, users, seed=7)
    for i in range(0, len(events), 64):
        await book.apply_charges(events[i : i + 64])
    for u in users:
        mine = [e for e in events if e.user_id == u]
        spent = sum(e.credits for e in mine)
        account = await reader.account(u)
        assert account.balance == 1000 - spent
        assert (account.lifetime_charged, account.lifetime_granted) == (spent, 1000)
        history, cursor = [], None
        while True:
            page = await reader.history(u, limit=17, cursor=cursor)
            history.extend(page.entries)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert len(history) == len(mine) + 1
        assert sum(e.amount for e in history) == account.balance
        assert history[0].balance_after == account.balance  # newest first
        assert {e.event_id for e in history if e.kind == "charge"} == {e.event_id for e in mine}
        usage = await reader.usage(u, "24h")
        assert usage["credits"] == spent and usage["requests"] == len(mine)
        assert usage["tokens"] == {
            "prompt": 3 * len(mine),
            "completion": 4 * len(mine),
            "cached": len(mine),
            "reasoning": 2 * len(mine),
            "total": 7 * len(mine),
        }
        assert usage["by_alias"]["gpt-4o"]["credits"] == spent
        assert usage["by_scene"]["chat"]["requests"] == len(mine)


async def test_every_event_id_applies_once_forever(book: Book, reader: Reader) -> None:
    events = [charge_event(5, 10) for _ in range(20)]
    first = await book.apply_charges(events)
    assert (first.applied, first.duplicates) == (20, 0)
    again = await book.apply_charges([*events[5:], *events[:5], events[0]])
    assert (again.applied, again.duplicates) == (0, 21)
    assert again.balances == {5: -200}
    assert (await reader.account(5)).balance == -200
    assert (await grant(book, 5, 300, "pay-1")).applied
    repeat = await grant(book, 5, 300, "pay-1")
    assert not repeat.applied and repeat.balance == 100


async def test_concurrent_writers_apply_each_event_once(ledger_url: str) -> None:
    engines = [open_engine(ledger_url) for _ in range(3)]
    try:
        await migrate(engines[0])
        events = random_charges(400, [1, 2, 3, 4], seed=3)
        books = [Book(e) for e in engines]
        # Every writer gets every event, in overlapping batches of different sizes.
        await asyncio.gather(
            *(
                _apply_in_batches(b, events[i * 50 :] + events[: i * 50], size)
                for i, (b, size) in enumerate(zip(books, (7, 50, 400), strict=True))
            )
        )
        reader = Reader(engines[0])
        for u in (1, 2, 3, 4):
            spent = sum(e.credits for e in events if e.user_id == u)
            assert (await reader.account(u)).balance == -spent
        async with engines[0].connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(entries))).scalar()
        assert count == len(events)
    finally:
        for e in engines:
            await e.dispose()


async def _apply_in_batches(book: Book, events: list, size: int) -> None:
    for i in range(0, len(events), size):
        await book.apply_charges(events[i : i + size])


async def test_a_total_that_would_leave_64_bits_is_rejected_alone(
    book: Book, reader: Reader
) -> None:
    await grant(book, 9, 10, "g")
    # The second charge would take lifetime_charged past 2^63 - 1; the others apply.
    events = [charge_event(9, MAX_AMOUNT - 100), charge_event(9, 200), charge_event(9, 1)]
    result = await book.apply_charges(events)
    assert result.applied == 2 and set(result.rejected) == {events[1].event_id}
    assert (await reader.account(9)).balance == 10 - (MAX_AMOUNT - 100) - 1


async def test_adjust_respects_the_floor_unless_allowed(book: Book, reader: Reader) -> None:
    await grant(book, 4, 50, "g")
    with pytest.raises(ValueError, match="below 0"):
        await adjust(book, 4, -60, "a1", "refund of a double top-up")
    assert (await reader.account(4)).balance == 50
    assert (await adjust(book, 4, -60, "a1", "fix", allow_negative=True)).balance == -10
    assert (await adjust(book, 4, 5, "a2", "goodwill")).balance == -5  # up is always fine
    assert not (await adjust(book, 4, 5, "a2", "goodwill")).applied
    kinds = [e.kind for e in (await reader.history(4)).entries]
    assert kinds == ["adjustment", "adjustment", "grant"]


async def test_usage_periods_read_the_hour_of_the_event(book: Book, reader: Reader) -> None:
    now = datetime.now(UTC)

    def at(delta: timedelta, credits: int, alias: str = "a") -> object:
        ms = int((now - delta).timestamp() * 1000)
        return charge_event(8, credits, alias=alias, scene="s", unix_ms=ms)

    await book.apply_charges(
        [
            at(timedelta(minutes=1), 1),
            at(timedelta(hours=3), 2, alias="b"),
            at(timedelta(days=2), 4),
            at(timedelta(days=20), 8),
            at(timedelta(days=100), 16),
        ]
    )
    got = {p: (await reader.usage(8, p, now))["credits"] for p in ("24h", "7d", "30d", "all")}
    assert got == {"24h": 3, "7d": 7, "30d": 15, "all": 31}
    day = await reader.usage(8, "24h", now)
    assert {k: v["credits"] for k, v in day["by_alias"].items()} == {"a": 1, "b": 2}
    assert (await reader.usage(99, "all"))["requests"] == 0


async def test_unknown_user_has_balance_zero_and_is_blocked(reader: Reader) -> None:
    account = await reader.account(12345)
    assert account.balance == 0 and account.is_blocked


@settings(max_examples=25, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["charge", "grant", "again"]),
            st.integers(min_value=1, max_value=3),  # user
            st.integers(min_value=0, max_value=10**12),  # amount
        ),
        max_size=40,
    ),
    batch=st.integers(min_value=1, max_value=8),
)
def test_invariants_hold_for_any_mix_of_postings(
    ops: list[tuple[str, int, int]], batch: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Whatever the mix of charges, grants and redeliveries and however it is batched:
    each balance = the sum of its entries = grants - charges of the distinct ids, and
    balance_after chains entry to entry."""
    url = f"sqlite:///{tmp_path_factory.mktemp('prop') / 'ledger.sqlite3'}"
    asyncio.run(_check_invariants(url, ops, batch))


async def _check_invariants(url: str, ops: list[tuple[str, int, int]], batch: int) -> None:
    engine = open_engine(url)
    try:
        await migrate(engine)
        book, reader = Book(engine), Reader(engine)
        sent: list = []
        expected = {1: 0, 2: 0, 3: 0}
        pending: list = []
        for i, (kind, user, amount) in enumerate(ops):
            if kind == "grant":
                await grant(book, user, amount + 1, f"g{i}")
                expected[user] += amount + 1
            elif kind == "again" and sent:
                pending.append(sent[amount % len(sent)])  # a redelivery: no effect
            else:
                event = charge_event(user, amount)
                sent.append(event)
                pending.append(event)
                expected[user] -= amount
            if len(pending) >= batch:
                await book.apply_charges(pending)
                pending = []
        await book.apply_charges(pending)
        for user, balance in expected.items():
            assert (await reader.account(user)).balance == balance
            history = list(reversed((await reader.history(user, limit=1000)).entries))
            running = 0
            for entry in history:
                running += entry.amount
                assert entry.balance_after == running
            assert running == balance
        async with engine.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(entries))).scalar()
        grants = sum(1 for k, _, _ in ops if k == "grant")
        assert count == len({e.event_id for e in sent}) + grants
    finally:
        await engine.dispose()
