"""The whole loop: grant → charged requests → ledger → guard blocks → grant → served
(real redis-server, real broker, the reference ledger; issue 8 acceptance)."""

from __future__ import annotations

import asyncio
import contextlib

from proxy.contract.charge_event import ChargeEvent
from proxy.ledger.consumer import LedgerConsumer, LedgerSettings
from proxy.ledger.store import CreditStore
from tests.fixtures_kafka import consume_messages
from tests.fixtures_proxy import StartProxy

REQ = {"model": "premium", "messages": [{"role": "user", "content": "what do figs cost?"}]}
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
    redis_client,
    redis_prefix: str,
    kafka_broker,
    kafka_topic: str,
) -> None:
    h = await start_proxy(
        redis_url=redis_server.url,
        guard_prefix=redis_prefix,
        kafka_bootstrap=kafka_broker.bootstrap,
        topic=kafka_topic,
    )
    credits = CreditStore(redis_client, prefix=redis_prefix)
    consumer = LedgerConsumer(
        LedgerSettings(
            topic=kafka_topic,
            bootstrap=kafka_broker.bootstrap,
            group_id=f"ledger-{kafka_topic}",
            prefix=redis_prefix,
            idempotent_producer=kafka_broker.supports_idempotence,
            session_timeout_ms=3000,
            rebalance_timeout_ms=500,
        ),
        redis_client,
    )
    task = asyncio.create_task(consumer.run())
    try:
        await credits.grant(USER, 1000, reason="welcome")
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
        balance = await credits.balance(USER)
        assert balance == 1000 - spent <= 0
        upstream_calls = len(h.recorder.requests)
        status, _, _ = await h.chat(REQ, h.headers(user_id=USER))
        assert status == 402 and len(h.recorder.requests) == upstream_calls

        await credits.grant(USER, 5000, reason="top-up")
        status, _, _ = await h.chat(REQ, h.headers(user_id=USER))
        assert status == 200  # served again at once: the grant cleared the block
        await wait_applied(consumer, served + 1)
        shown = await credits.show(USER)
        assert shown.balance == await credits.balance(USER) < 1000 - spent + 5000
    finally:
        consumer.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
