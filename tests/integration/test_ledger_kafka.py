"""The ledger consumer against a real Kafka-protocol broker (tansu) and redis-server:
exact debits, harmless replays, a crash between apply and commit, dead letters,
and SIGTERM on the real `llm-proxy ledger` process."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from redis.asyncio import Redis

from proxy.contract.charge_event import ChargeEvent, new_event_id
from proxy.contract.outcome import Outcome
from proxy.contract.usage import Usage, UsageSource
from proxy.delivery.kafka import make_producer
from proxy.ledger.consumer import LedgerConsumer, LedgerSettings
from proxy.ledger.store import CreditStore
from tests.fixtures_kafka import KafkaBroker, consume_messages
from tests.fixtures_redis import RedisServer

WAIT_S = 60.0  # upper bound for a wait, never a timing assertion


def charge_event(user_id: int, credits: int) -> ChargeEvent:
    return ChargeEvent(
        event_id=new_event_id(time.time_ns() // 1_000_000),
        occurred_at="2024-05-01T12:00:00.123Z",
        started_at="2024-05-01T12:00:00.122Z",
        request_id=uuid.uuid4().hex,
        user_id=user_id,
        scene="chat",
        conversation_id="c1",
        alias="gpt-4o",
        provider="openai",
        upstream_model="gpt-4o",
        stream=True,
        usage=Usage(prompt_tokens=3, completion_tokens=4),
        usage_source=UsageSource.UPSTREAM,
        price_rule="gpt4o",
        credits=credits,
        outcome=Outcome.COMPLETED,
        latency_ms=1.0,
        ttft_ms=0.5,
    )


@pytest.fixture
async def producer(kafka_broker: KafkaBroker) -> AsyncIterator[AIOKafkaProducer]:
    p = make_producer(kafka_broker.bootstrap, idempotent=kafka_broker.supports_idempotence)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def send_events(
    producer: AIOKafkaProducer, topic: str, events: Sequence[ChargeEvent]
) -> None:
    for e in events:
        await producer.send_and_wait(
            topic, e.to_json(), key=e.kafka_key(), headers=[("event_id", e.event_id.encode())]
        )


def settings(
    broker: KafkaBroker, topic: str, prefix: str, group: str | None = None
) -> LedgerSettings:
    return LedgerSettings(
        topic=topic,
        bootstrap=broker.bootstrap,
        group_id=group or f"ledger-{uuid.uuid4().hex[:8]}",
        prefix=prefix,
        idempotent_producer=broker.supports_idempotence,
        poll_timeout_ms=100,
        session_timeout_ms=3000,
        rebalance_timeout_ms=500,
    )


async def run_until(
    consumer: LedgerConsumer, done: Callable[[], Awaitable[bool]], what: str
) -> None:
    """Run the consumer until `done()` holds, then stop it gracefully."""
    task = asyncio.create_task(consumer.run())
    try:
        deadline = time.monotonic() + WAIT_S
        while not await done():
            if task.done():
                task.result()  # surface the consumer's exception
                pytest.fail(f"consumer ended before {what}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; stats {consumer.stats}")
            await asyncio.sleep(0.05)
    finally:
        consumer.stop()
        await asyncio.wait_for(task, WAIT_S)


def processed(consumer: LedgerConsumer, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        s = consumer.stats
        return s.applied + s.duplicates + s.dead_lettered >= n

    return check


async def committed(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """The group's committed offset per partition; -1 = never committed."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        offsets = {p: await c.committed(TopicPartition(topic, p)) for p in range(3)}
        return {p: -1 if off is None else off for p, off in offsets.items()}
    finally:
        await c.stop()


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """End offset per partition, -1 for an empty one (a consumer never commits there)."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(3)]
        ends = await c.end_offsets(tps)
        return {tp.partition: off or -1 for tp, off in ends.items()}
    finally:
        await c.stop()


def random_charges(n: int, users: Sequence[int], seed: int) -> list[ChargeEvent]:
    rnd = random.Random(seed)
    return [charge_event(rnd.choice(users), rnd.randint(0, 50)) for _ in range(n)]


def expected_balances(start: int, users: Sequence[int], events: Sequence[ChargeEvent]) -> dict:
    return {u: start - sum(e.credits for e in events if e.user_id == u) for u in users}


async def balances(store: CreditStore, users: Sequence[int]) -> dict[int, int]:
    return {u: await store.balance(u) for u in users}


async def test_consumes_all_then_replay_changes_nothing(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    redis_client: Redis,
    redis_prefix: str,
) -> None:
    users = [101, 102, 103]
    store = CreditStore(redis_client, prefix=redis_prefix)
    for u in users:
        await store.grant(u, 1000)
    events = random_charges(40, users, seed=1)
    await send_events(producer, kafka_topic, events)

    cfg = settings(kafka_broker, kafka_topic, redis_prefix)
    first = LedgerConsumer(cfg, redis_client)
    await run_until(first, processed(first, 40), "40 events")

    assert first.stats.applied == 40 and first.stats.duplicates == 0
    assert await balances(store, users) == expected_balances(1000, users, events)
    ends = await end_offsets(kafka_broker.bootstrap, kafka_topic)
    assert await committed(kafka_broker.bootstrap, kafka_topic, cfg.group_id) == ends

    # A new group starts at offset 0: every event comes again, none is applied again.
    replay = LedgerConsumer(settings(kafka_broker, kafka_topic, redis_prefix), redis_client)
    await run_until(replay, processed(replay, 40), "the replay")
    assert (replay.stats.applied, replay.stats.duplicates) == (0, 40)
    assert await balances(store, users) == expected_balances(1000, users, events)
    for u in users:
        charges = [e for e in await store.entries(u, limit=100) if e.kind == "charge"]
        assert len(charges) == sum(1 for e in events if e.user_id == u)


async def test_crash_between_apply_and_commit_does_not_double_debit(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    redis_client: Redis,
    redis_prefix: str,
) -> None:
    users = [201, 202]
    store = CreditStore(redis_client, prefix=redis_prefix)
    events = random_charges(25, users, seed=2)
    await send_events(producer, kafka_topic, events)
    cfg = settings(kafka_broker, kafka_topic, redis_prefix)

    crashed_batch: list[ConsumerRecord] = []

    async def crash(batch: Sequence[ConsumerRecord]) -> None:
        crashed_batch.extend(batch)
        raise RuntimeError("simulated crash after apply, before commit")

    doomed = LedgerConsumer(cfg, redis_client, before_commit=crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        await asyncio.wait_for(doomed.run(), WAIT_S)
    assert crashed_batch and doomed.stats.applied == len(crashed_batch)
    assert set((await committed(kafka_broker.bootstrap, kafka_topic, cfg.group_id)).values()) == {
        -1
    }

    # Restart in the same group: the crashed batch is redelivered and skipped.
    restarted = LedgerConsumer(cfg, redis_client)
    await run_until(restarted, processed(restarted, 25), "redelivery")
    assert restarted.stats.duplicates == len(crashed_batch)
    assert restarted.stats.applied == 25 - len(crashed_batch)
    assert await balances(store, users) == expected_balances(0, users, events)


async def test_poison_messages_are_dead_lettered_and_the_next_event_applies(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    redis_client: Redis,
    redis_prefix: str,
) -> None:
    store = CreditStore(redis_client, prefix=redis_prefix)
    await store.grant(301, 100)
    good = charge_event(301, 7)
    bad_schema = good.to_dict() | {"credits": -3, "event_id": new_event_id(0)}
    nobody = good.to_dict() | {"user_id": 0, "event_id": new_event_id(0)}
    # Same key: one partition, so the good event really comes after the poison.
    key = good.kafka_key()
    await producer.send_and_wait(kafka_topic, b"\xff not json", key=key)
    await producer.send_and_wait(
        kafka_topic, orjson.dumps(bad_schema), key=key, headers=[("event_id", b"x")]
    )
    await producer.send_and_wait(kafka_topic, orjson.dumps(nobody), key=key)
    await send_events(producer, kafka_topic, [good])

    cfg = settings(kafka_broker, kafka_topic, redis_prefix)
    consumer = LedgerConsumer(cfg, redis_client)
    await run_until(consumer, processed(consumer, 4), "poison + good event")

    assert (consumer.stats.dead_lettered, consumer.stats.applied) == (3, 1)
    assert await store.balance(301) == 93
    dead = await consume_messages(kafka_broker.bootstrap, cfg.dead_letter_topic, 3, WAIT_S)
    assert [m.value for m in dead] == [
        b"\xff not json",
        orjson.dumps(bad_schema),
        orjson.dumps(nobody),
    ]
    assert all(m.key == key for m in dead)
    reasons = [(m.header("dlq_reason") or b"").decode() for m in dead]
    assert "not valid JSON" in reasons[0]
    assert "credits" in reasons[1]
    assert "user id" in reasons[2]
    assert dead[1].header("event_id") == b"x"  # original headers kept
    assert [m.header("dlq_source_topic") for m in dead] == [kafka_topic.encode()] * 3
    offsets = [int(m.header("dlq_source_offset") or b"-1") for m in dead]
    assert offsets[1] == offsets[0] + 1


async def test_sigterm_stops_the_ledger_process_gracefully(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    redis_server: RedisServer,
    redis_client: Redis,
    redis_prefix: str,
) -> None:
    store = CreditStore(redis_client, prefix=redis_prefix)
    events = random_charges(10, [401], seed=4)
    await send_events(producer, kafka_topic, events)
    group = f"ledger-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    env["LLM_PROXY_KAFKA_IDEMPOTENCE"] = "true" if kafka_broker.supports_idempotence else "false"
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "proxy", "ledger", "--json", "--group-id", group],
        *["--bootstrap", kafka_broker.bootstrap, "--topic", kafka_topic],
        *["--redis-url", redis_server.url, "--prefix", redis_prefix],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        expected = -sum(e.credits for e in events)
        deadline = time.monotonic() + WAIT_S
        while await store.balance(401) != expected or len(await store.entries(401)) < 10:
            assert proc.returncode is None, "ledger process exited early"
            assert time.monotonic() < deadline, "ledger process did not apply the events"
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert orjson.loads(out.splitlines()[-1])["applied"] == 10
    # It committed before leaving: the same group has nothing left to apply.
    ends = await end_offsets(kafka_broker.bootstrap, kafka_topic)
    assert await committed(kafka_broker.bootstrap, kafka_topic, group) == ends


async def test_events_wait_out_a_redis_outage_instead_of_being_skipped(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    redis_server: RedisServer,
    redis_client: Redis,
    redis_prefix: str,
) -> None:
    consumer = LedgerConsumer(settings(kafka_broker, kafka_topic, redis_prefix), redis_client)
    events = random_charges(5, [501], seed=5)
    await send_events(producer, kafka_topic, events)

    redis_server.stop()  # unpersisted: it comes back empty
    try:
        task = asyncio.create_task(consumer.run())
        deadline = time.monotonic() + WAIT_S
        while consumer.stats.retries == 0:  # polled, and failing against the dead Redis
            assert not task.done(), "consumer ended during the outage"
            assert time.monotonic() < deadline, "consumer never hit the outage"
            await asyncio.sleep(0.05)
        assert consumer.stats.applied == 0
    finally:
        redis_server.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while consumer.stats.applied < 5:
            assert not task.done(), "consumer ended after the outage"
            assert time.monotonic() < deadline, f"events not applied: {consumer.stats}"
            await asyncio.sleep(0.05)
    finally:
        consumer.stop()
        await asyncio.wait_for(task, WAIT_S)
    store = CreditStore(redis_client, prefix=redis_prefix)
    assert await store.balance(501) == -sum(e.credits for e in events)
