"""Calls of every endpoint → charge events on the real broker → the ledger (real
SQLite and PostgreSQL): each charge is applied with its endpoint, and the usage
breakdown by endpoint adds up to the events."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.contract.charge_event import ChargeEvent
from proxy.ledger.book import Book, grant
from proxy.ledger.consumer import LedgerConsumer, LedgerSettings
from proxy.ledger.reads import Reader
from tests.fixtures_kafka import consume_messages
from tests.fixtures_proxy import StartProxy
from tests.integration.test_endpoints_proxy import (
    ALIASES,
    COMPLETION_REQ,
    PROVIDERS,
    RESPONSE_REQ,
    post,
)

USER = 11


async def test_every_endpoint_reaches_the_ledger_with_its_endpoint(
    start_proxy: StartProxy, kafka_broker, kafka_topic: str, ledger_engine: AsyncEngine
) -> None:
    h = await start_proxy(
        extra_providers=PROVIDERS,
        extra_aliases=ALIASES,
        kafka_bootstrap=kafka_broker.bootstrap,
        topic=kafka_topic,
    )
    book, reader = Book(ledger_engine), Reader(ledger_engine)
    await grant(book, USER, 10_000, "welcome")
    consumer = LedgerConsumer(
        LedgerSettings(
            topic=kafka_topic,
            bootstrap=kafka_broker.bootstrap,
            group_id=f"ledger-{kafka_topic}",
            idempotent_producer=kafka_broker.supports_idempotence,
            session_timeout_ms=3000,
            rebalance_timeout_ms=500,
        ),
        book,
    )
    task = asyncio.create_task(consumer.run())
    try:
        headers = h.headers(user_id=USER)
        calls = [
            ("/v1/responses", {**RESPONSE_REQ, "stream": True}),
            ("/v1/responses", RESPONSE_REQ),
            ("/v1/embeddings", {"model": "embed", "input": ["memory one", "memory two"]}),
            ("/v1/completions", {**COMPLETION_REQ, "stream": True}),
            ("/v1/chat/completions", {"model": "multi", "messages": [
                {"role": "user", "content": "hi"}]}),
        ]  # fmt: skip
        for path, body in calls:
            status, _, _ = await post(h, path, body, headers)
            assert status == 200, path
        msgs = await consume_messages(kafka_broker.bootstrap, kafka_topic, len(calls), timeout=20)
        events = [ChargeEvent.from_json(m.value) for m in msgs]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while consumer.stats.applied < len(calls):
            assert loop.time() < deadline, f"applied {consumer.stats.applied}"
            await asyncio.sleep(0.02)
    finally:
        consumer.stop()
        await task

    want: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in events:
        want[e.endpoint][0] += e.credits
        want[e.endpoint][1] += 1
    assert set(want) == {"responses", "embeddings", "completions", "chat.completions"}
    usage = await reader.usage(USER, "24h")
    got = {k: [v["credits"], v["requests"]] for k, v in usage["by_endpoint"].items()}
    assert got == dict(want)
    assert usage["by_endpoint"]["embeddings"]["tokens"]["completion"] == 0
    assert (await reader.account(USER)).balance == 10_000 - sum(e.credits for e in events)
    history = (await reader.history(USER, limit=10)).entries
    by_id = {e.event_id: e.endpoint for e in events}
    assert {e.event_id: e.endpoint for e in history if e.kind == "charge"} == by_id
