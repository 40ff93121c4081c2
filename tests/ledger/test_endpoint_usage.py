"""The endpoint a charge was for, in the ledger (real SQLite and PostgreSQL): the
entries carry it (migration 2) and the usage breakdown groups by it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.ledger.book import Book, grant
from proxy.ledger.database import migrate, open_engine
from proxy.ledger.reads import Reader
from proxy.ledger.schema import SCHEMA_VERSION
from tests.ledger_events import charge_event


async def test_usage_by_endpoint_over_the_rollups_hours(ledger_engine: AsyncEngine) -> None:
    book, reader = Book(ledger_engine), Reader(ledger_engine)
    now = datetime.now(UTC)

    def at(delta: timedelta, credits: int, endpoint: str) -> object:
        ms = int((now - delta).timestamp() * 1000)
        return charge_event(9, credits, unix_ms=ms, endpoint=endpoint, prompt=10, completion=0)

    await grant(book, 9, 100, "g")  # not a charge: in no endpoint
    await book.apply_charges(
        [
            at(timedelta(minutes=1), 1, "responses"),
            at(timedelta(minutes=2), 2, "responses"),
            at(timedelta(hours=2), 4, "embeddings"),
            at(timedelta(hours=3), 8, "chat.completions"),
            at(timedelta(days=3), 16, "completions"),
        ]
    )
    day = await reader.usage(9, "24h", now)
    by = {k: (v["credits"], v["requests"]) for k, v in day["by_endpoint"].items()}
    assert by == {"responses": (3, 2), "embeddings": (4, 1), "chat.completions": (8, 1)}
    assert sum(v["credits"] for v in day["by_endpoint"].values()) == day["credits"]
    assert day["by_endpoint"]["embeddings"]["tokens"]["prompt"] == 10
    every = await reader.usage(9, "all", now)
    assert every["by_endpoint"]["completions"]["credits"] == 16
    assert sum(v["credits"] for v in every["by_endpoint"].values()) == every["credits"] == 31
    history = (await reader.history(9)).entries
    assert sorted(str(e.endpoint) for e in history) == [
        "None",
        "chat.completions",
        "completions",
        "embeddings",
        "responses",
        "responses",
    ]


async def test_migration_2_adds_the_column_to_a_version_1_database(tmp_path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.sqlite3'}"
    engine = open_engine(url)
    try:
        await migrate(engine)
        async with engine.begin() as conn:  # what a version-1 database looks like
            await conn.execute(text("ALTER TABLE entries DROP COLUMN endpoint"))
            await conn.execute(text("UPDATE ledger_schema SET version = 1"))
        assert await migrate(engine) == (1, SCHEMA_VERSION)
        async with engine.connect() as conn:
            cols = await conn.run_sync(
                lambda c: {x["name"] for x in inspect(c).get_columns("entries")}
            )
        assert "endpoint" in cols
        book = Book(engine)
        await book.apply_charges([charge_event(3, 5, endpoint="embeddings")])
        usage = await Reader(engine).usage(3, "all")
        assert usage["by_endpoint"] == {"embeddings": usage["by_endpoint"]["embeddings"]}
    finally:
        await engine.dispose()


def test_credits_usage_prints_the_endpoint_breakdown(ledger_url: str, capsys) -> None:
    from tests.ledger.test_cli import run_cli

    async def charge() -> None:
        engine = open_engine(ledger_url)
        try:
            await Book(engine).apply_charges(
                [
                    charge_event(5, 7, endpoint="responses"),
                    charge_event(5, 2, endpoint="embeddings"),
                ]
            )
        finally:
            await engine.dispose()

    url = ["--database-url", ledger_url]
    assert run_cli(["ledger", "migrate", *url]) == 0
    asyncio.run(charge())
    capsys.readouterr()
    assert run_cli(["credits", "usage", "5", "--period", "24h", *url]) == 0
    text = capsys.readouterr().out
    assert "endpoint responses: 7 credits, 1 requests" in text
    assert "endpoint embeddings: 2 credits, 1 requests" in text
