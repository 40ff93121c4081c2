"""The whole loop: grant → charged requests → Kafka → ledger (database of record) →
Redis projection → guard blocks → grant → served (real redis-server, real broker,
real SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.contract.charge_event import ChargeEvent
from proxy.contract.redis_keys import RedisKeys
from proxy.ledger.book import Book, grant
from proxy.ledger.consumer import LedgerConsumer, LedgerSettings
from proxy.ledger.projection import Projection
from proxy.ledger.reads import Reader
from tests.fixtures_kafka import consume_messages
from tests.fixtures_proxy import StartProxy

# The output limit keeps the admission estimate (~450 credits) within the grant.
REQ = {
    "model": "premium",
    "messages": [{"role": "user", "content": "what do figs cost?"}],
    "max_tokens": 16,
}
USER = 7


async def wait_applied(consumer: LedgerConsumer, n: int, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while consumer.stats.applied < n:
        assert loop.time() < deadline, f"ledger applied {consumer.stats.applied} of {n}"
        await asyncio.sleep(0.02)


async def test_grant_charge_block_grant_serve(
    start_proxy: StartProxy,
    redis_server,
    redis_client: Redis,
    redis_prefix: str,
    kafka_broker,
    kafka_topic: str,
    ledger_engine: AsyncEngine,
) -> None:
    h = await start_proxy(
        redis_url=redis_server.url,
        guard_prefix=redis_prefix,
        kafka_bootstrap=kafka_broker.bootstrap,
        topic=kafka_topic,
    )
    book, reader = Book(ledger_engine), Reader(ledger_engine)
    projection = Projection(redis_client, redis_prefix)

    async def top_up(amount: int, key: str) -> None:
        change = await grant(book, USER, amount, key)
        await projection.write([(USER, change.balance)])  # what `credits grant` does

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
        projection,
    )
    task = asyncio.create_task(consumer.run())
    try:
        await top_up(1000, "welcome")
        served = 0
        for _ in range(20):
            status, body, _ = await h.chat(REQ, h.headers(user_id=USER))
            if status == 402:
                assert body["error"]["code"] == "credit_balance_insufficient"
                break
            assert status == 200
            served += 1
            await wait_applied(consumer, served)
        else:
            raise AssertionError("never blocked")
        assert served >= 2  # ~280 credits a call: several calls fit in 1,000
        msgs = await consume_messages(kafka_broker.bootstrap, kafka_topic, served, timeout=20)
        spent = sum(ChargeEvent.from_json(m.value).credits for m in msgs)
        assert len(msgs) == served
        balance = (await reader.account(USER)).balance
        # Reserve mode: refused while what is left no longer covers an estimate,
        # never overdrawn; the consumer's projection released every hold.
        assert 0 <= balance == 1000 - spent
        for _ in range(250):
            if not await redis_client.hgetall(RedisKeys(redis_prefix).holds(USER)):
                break
            await asyncio.sleep(0.02)
        assert await redis_client.hgetall(RedisKeys(redis_prefix).holds(USER)) == {}
        upstream_calls = len(h.recorder.requests)
        status, _, _ = await h.chat(REQ, h.headers(user_id=USER))
        assert status == 402 and len(h.recorder.requests) == upstream_calls

        await top_up(5000, "top-up")
        status, _, _ = await h.chat(REQ, h.headers(user_id=USER))
        assert status == 200  # served again at once: the grant cleared the block
        await wait_applied(consumer, served + 1)
        account = await reader.account(USER)
        assert account.balance < 1000 - spent + 5000
        usage = await reader.usage(USER, "24h")
        assert usage["requests"] == served + 1
        assert usage["credits"] == account.lifetime_charged == 6000 - account.balance
    finally:
        consumer.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
