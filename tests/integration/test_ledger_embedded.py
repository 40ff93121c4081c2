"""Embedded mode: no Kafka. The proxy's outbox publisher applies the charge events to
the embedded ledger (real SQLite and PostgreSQL), so requests are debited, an
exhausted user is blocked and the history is kept, with no Redis at all (the guard
asks the books) or with Redis (the projection is written)."""

from __future__ import annotations

from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.contract.redis_keys import RedisKeys, decode_snapshot
from proxy.delivery.outbox import OutboxRow
from proxy.ledger.book import Book, grant
from proxy.ledger.embedded import LedgerSink, open_embedded_ledger
from proxy.ledger.reads import Reader
from proxy.ledger.schema import dead_letters
from tests.fixtures_proxy import StartProxy
from tests.fixtures_redis import RedisServer
from tests.ledger_events import charge_event

# 10 credits a token; the output limit keeps the admission estimate (prompt bytes +
# 16 output tokens, ~450 credits) within the grants below (guard.mode: reserve).
REQ = {
    "model": "premium",
    "messages": [{"role": "user", "content": "what do figs cost?"}],
    "max_tokens": 16,
}


async def test_debits_blocks_and_history_without_kafka_or_redis(
    start_proxy: StartProxy, ledger_url: str, ledger_engine: AsyncEngine
) -> None:
    h = await start_proxy(
        settings_overrides={"ledger_database_url": ledger_url},
        embedded_ledger=open_embedded_ledger,
        # The first balance read opens a database connection; on a busy CI box that
        # can take longer than the 50 ms default budget (then the guard fails open).
        guard={"budget_ms": 5000},
    )
    assert "embedded ledger" in h.state.sink_description
    book, reader = Book(ledger_engine), Reader(ledger_engine)

    status, body, _ = await h.chat(REQ, h.headers(user_id=8))  # never granted anything
    assert status == 402 and isinstance(body, dict)
    assert body["error"]["code"] == "credit_balance_insufficient"

    await grant(book, 7, 1000, "welcome")
    served = 0
    for _ in range(20):
        status, body, _ = await h.chat(REQ, h.headers(user_id=7))
        if status == 402:
            break
        assert status == 200
        served += 1
        await h.flush_events()
    else:
        raise AssertionError("never blocked")
    assert served >= 2
    # Refused before the credit ran out: what is left does not cover the estimate.
    assert isinstance(body, dict) and "may cost up to" in body["error"]["message"]
    account = await reader.account(7)
    assert account.balance >= 0 and account.lifetime_charged == 1000 - account.balance
    history = (await reader.history(7, limit=100)).entries
    assert [e.kind for e in history].count("charge") == served
    usage = await reader.usage(7, "24h")
    assert (usage["requests"], usage["credits"]) == (served, account.lifetime_charged)

    await grant(book, 7, 5000, "top-up")
    status, _, _ = await h.chat(REQ, h.headers(user_id=7))
    assert status == 200  # the guard reads the books: no cache to wait for


async def test_with_redis_the_embedded_ledger_writes_the_projection(
    start_proxy: StartProxy,
    ledger_url: str,
    ledger_engine: AsyncEngine,
    redis_server: RedisServer,
    redis_client: Redis,
    redis_prefix: str,
) -> None:
    h = await start_proxy(
        redis_url=redis_server.url,
        guard_prefix=redis_prefix,
        settings_overrides={"ledger_database_url": ledger_url},
        embedded_ledger=open_embedded_ledger,
    )
    await grant(Book(ledger_engine), 9, 10_000, "g")
    status, _, _ = await h.chat(REQ, h.headers(user_id=9))
    assert status == 200
    await h.flush_events()
    balance = (await Reader(ledger_engine).account(9)).balance
    assert balance < 10_000
    raw = await redis_client.get(RedisKeys(redis_prefix).snapshot(9))
    assert raw is not None and decode_snapshot(raw) == balance


def row(seq: int, payload: bytes) -> OutboxRow:
    return OutboxRow(seq=seq, event_id=f"e{seq}", key=b"1", payload=payload, created_at=0.0)


async def test_the_sink_dead_letters_poison_and_applies_the_rest_once(
    ledger_engine: AsyncEngine,
) -> None:
    sink = LedgerSink(ledger_engine, None)
    good, later = charge_event(21, 4), charge_event(21, 6)
    poison = good.to_json().replace(b'"credits":4', b'"credits":-4')
    batch = [row(1, b"not json"), row(2, poison), row(3, good.to_json()), row(4, later.to_json())]
    await sink.send_batch(batch)
    await sink.send_batch(batch)  # the publisher re-sends after a failed delete
    assert (sink.applied, sink.duplicates) == (2, 2)
    assert (await Reader(ledger_engine).account(21)).balance == -10
    async with ledger_engine.connect() as conn:
        rows = (await conn.execute(select(dead_letters.c.payload, dead_letters.c.reason))).all()
        count = (await conn.execute(select(func.count()).select_from(dead_letters))).scalar()
    assert count == 2  # once per distinct payload
    assert {r.payload for r in rows} == {b"not json", poison}
    assert any("credits" in r.reason for r in rows)


async def test_with_kafka_configured_the_embedded_ledger_is_not_used(
    start_proxy: StartProxy, ledger_url: str
) -> None:
    h = await start_proxy(
        kafka_bootstrap="127.0.0.1:9",  # never reached: nothing is sent
        settings_overrides={"ledger_database_url": ledger_url},
        embedded_ledger=open_embedded_ledger,
    )
    assert h.state.sink_description.startswith("kafka")
