"""The ledger consumer against a real Kafka-protocol broker (tansu) and real databases
(SQLite and PostgreSQL): balance, history and usage equal the sum of the events,
harmless replays, a crash between the transaction and the offset commit, kill -9 of
the process, dead letters that never block, two consumers sharing the partitions,
SIGTERM, a database outage (waited out), a Redis outage (projection deferred), and an
unmigrated database refused."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.contract.charge_event import MAX_CREDITS, ChargeEvent, new_event_id
from proxy.contract.redis_keys import RedisKeys, decode_snapshot
from proxy.delivery.kafka import create_topic, make_producer
from proxy.errors import LedgerNotMigrated
from proxy.ledger.book import MAX_AMOUNT, Book, adjust, grant
from proxy.ledger.consumer import LedgerConsumer, LedgerSettings
from proxy.ledger.database import open_engine
from proxy.ledger.metrics import LedgerMetrics
from proxy.ledger.projection import Projection
from proxy.ledger.reads import Reader
from proxy.ledger.schema import entries
from tests.fixtures_kafka import KafkaBroker, consume_messages
from tests.fixtures_postgres import PostgresServer
from tests.fixtures_redis import RedisServer
from tests.ledger_events import charge_event, random_charges
from tests.servers import free_port

WAIT_S = 60.0  # upper bound for a wait, never a timing assertion


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


def settings(broker: KafkaBroker, topic: str, group: str | None = None) -> LedgerSettings:
    return LedgerSettings(
        topic=topic,
        bootstrap=broker.bootstrap,
        group_id=group or f"ledger-{uuid.uuid4().hex[:8]}",
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


def expected_balances(start: int, users: Sequence[int], events: Sequence[ChargeEvent]) -> dict:
    return {u: start - sum(e.credits for e in events if e.user_id == u) for u in users}


async def balances(reader: Reader, users: Sequence[int]) -> dict[int, int]:
    return {u: (await reader.account(u)).balance for u in users}


async def entry_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(entries))).scalar() or 0)


@pytest.fixture
def book(ledger_engine: AsyncEngine) -> Book:
    return Book(ledger_engine)


@pytest.fixture
def reader(ledger_engine: AsyncEngine) -> Reader:
    return Reader(ledger_engine)


async def test_balance_history_and_usage_equal_the_events_and_a_replay_changes_nothing(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    ledger_engine: AsyncEngine,
    book: Book,
    reader: Reader,
) -> None:
    users = [101, 102, 103]
    for u in users:
        await grant(book, u, 1000, f"welcome-{u}")
    events = random_charges(60, users, seed=1)
    await send_events(producer, kafka_topic, events)

    cfg = settings(kafka_broker, kafka_topic)
    first = LedgerConsumer(cfg, book)
    await run_until(first, processed(first, 60), "60 events")

    assert first.stats.applied == 60 and first.stats.duplicates == 0
    assert await balances(reader, users) == expected_balances(1000, users, events)
    for u in users:
        mine = [e for e in events if e.user_id == u]
        usage = await reader.usage(u, "24h")
        assert (usage["credits"], usage["requests"]) == (sum(e.credits for e in mine), len(mine))
        assert usage["tokens"]["total"] == sum(e.usage.total_tokens for e in mine)
        history = (await reader.history(u, limit=1000)).entries
        assert sorted(e.event_id for e in history if e.kind == "charge") == sorted(
            e.event_id for e in mine
        )
    ends = await end_offsets(kafka_broker.bootstrap, kafka_topic)
    assert await committed(kafka_broker.bootstrap, kafka_topic, cfg.group_id) == ends

    # A new group starts at offset 0: every event comes again, none is applied again.
    replay = LedgerConsumer(settings(kafka_broker, kafka_topic), book)
    await run_until(replay, processed(replay, 60), "the replay")
    assert (replay.stats.applied, replay.stats.duplicates) == (0, 60)
    assert await balances(reader, users) == expected_balances(1000, users, events)
    assert await entry_count(ledger_engine) == 60 + len(users)


async def test_crash_between_transaction_and_commit_does_not_double_debit(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    book: Book,
    reader: Reader,
) -> None:
    users = [201, 202]
    events = random_charges(25, users, seed=2)
    await send_events(producer, kafka_topic, events)
    cfg = settings(kafka_broker, kafka_topic)

    crashed_batch: list[ConsumerRecord] = []

    async def crash(batch: Sequence[ConsumerRecord]) -> None:
        crashed_batch.extend(batch)
        raise RuntimeError("simulated crash after the transaction, before the commit")

    doomed = LedgerConsumer(cfg, book, before_commit=crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        await asyncio.wait_for(doomed.run(), WAIT_S)
    assert crashed_batch and doomed.stats.applied == len(crashed_batch)
    assert set((await committed(kafka_broker.bootstrap, kafka_topic, cfg.group_id)).values()) == {
        -1
    }

    # Restart in the same group: the crashed batch is redelivered and skipped.
    restarted = LedgerConsumer(cfg, book)
    await run_until(restarted, processed(restarted, 25), "redelivery")
    assert restarted.stats.duplicates == len(crashed_batch)
    assert restarted.stats.applied == 25 - len(crashed_batch)
    assert await balances(reader, users) == expected_balances(0, users, events)


async def test_poison_events_are_dead_lettered_and_the_next_events_apply(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    book: Book,
    reader: Reader,
) -> None:
    await grant(book, 301, 100, "g")
    good = charge_event(301, 7)
    later = charge_event(301, 2)
    poison = [
        b"\xff not json",
        orjson.dumps(good.to_dict() | {"credits": -3, "event_id": new_event_id(0)}),
        orjson.dumps(good.to_dict() | {"user_id": 0, "event_id": new_event_id(1)}),
        orjson.dumps(good.to_dict() | {"credits": MAX_AMOUNT + 1, "event_id": new_event_id(2)}),
        orjson.dumps(good.to_dict() | {"alias": "a\u0000b", "event_id": new_event_id(3)}),
    ]
    # Same key: one partition, so the good events really come after the poison.
    key = good.kafka_key()
    for i, value in enumerate(poison):
        await producer.send_and_wait(
            kafka_topic, value, key=key, headers=[("event_id", str(i).encode())]
        )
    await send_events(producer, kafka_topic, [good, later])

    cfg = settings(kafka_broker, kafka_topic)
    metrics = LedgerMetrics()
    consumer = LedgerConsumer(cfg, book, metrics=metrics)
    await run_until(consumer, processed(consumer, 7), "poison + good events")

    assert (consumer.stats.dead_lettered, consumer.stats.applied) == (5, 2)
    scraped = {
        (s.name, s.labels.get("result")): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    assert scraped[("llm_ledger_events_total", "dead_lettered")] == 5
    assert scraped[("llm_ledger_events_total", "applied")] == 2
    assert scraped[("llm_ledger_last_batch_timestamp_seconds", None)] > 0
    assert (await reader.account(301)).balance == 91
    dead = await consume_messages(kafka_broker.bootstrap, cfg.dead_letter_topic, 5, WAIT_S)
    assert [m.value for m in dead] == poison
    assert all(m.key == key for m in dead)
    reasons = [(m.header("dlq_reason") or b"").decode() for m in dead]
    assert "not valid JSON" in reasons[0]
    assert "credits" in reasons[1] and "user id" in reasons[2]
    # Over the contract's bound (proxy.contract.charge_event.MAX_CREDITS): the reader
    # refuses it before the books are asked.
    assert "credits" in reasons[3] and "NUL" in reasons[4]
    assert [m.header("event_id") for m in dead] == [str(i).encode() for i in range(5)]
    assert [m.header("dlq_source_topic") for m in dead] == [kafka_topic.encode()] * 5


async def test_an_event_the_database_refuses_is_dead_lettered_alone(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    book: Book,
    reader: Reader,
) -> None:
    # Valid events (each within the contract's credit bound); an operator correction
    # left the account near the 64-bit floor, so only the second one would leave it.
    start = -(MAX_AMOUNT - MAX_CREDITS)
    await adjust(book, 302, start, "near-floor", "test: near the floor", allow_negative=True)
    events = [charge_event(302, 5), charge_event(302, MAX_CREDITS), charge_event(302, 1)]
    await send_events(producer, kafka_topic, events)
    cfg = settings(kafka_broker, kafka_topic)
    consumer = LedgerConsumer(cfg, book)
    await run_until(consumer, processed(consumer, 3), "three events")
    assert (consumer.stats.applied, consumer.stats.dead_lettered) == (2, 1)
    assert (await reader.account(302)).balance == start - 6
    dead = await consume_messages(kafka_broker.bootstrap, cfg.dead_letter_topic, 1, WAIT_S)
    assert [m.value for m in dead] == [events[1].to_json()]


async def test_two_consumers_in_one_group_apply_each_event_once(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    ledger_engine: AsyncEngine,
    ledger_url: str,
    book: Book,
    reader: Reader,
) -> None:
    users = list(range(601, 613))  # spread over the 3 partitions
    events = random_charges(300, users, seed=6)
    cfg = settings(kafka_broker, kafka_topic, group=f"pair-{uuid.uuid4().hex[:8]}")
    other_engine = open_engine(ledger_url)  # a second process would have its own pool
    a, b = LedgerConsumer(cfg, book), LedgerConsumer(cfg, Book(other_engine))
    tasks = [asyncio.create_task(c.run()) for c in (a, b)]
    try:
        await send_events(producer, kafka_topic, events)
        deadline = time.monotonic() + WAIT_S
        while await entry_count(ledger_engine) < 300:
            assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
            assert time.monotonic() < deadline, f"stats {a.stats} {b.stats}"
            await asyncio.sleep(0.1)
    finally:
        for c in (a, b):
            c.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        await other_engine.dispose()
    assert a.stats.applied + b.stats.applied == 300
    assert await entry_count(ledger_engine) == 300
    assert await balances(reader, users) == expected_balances(0, users, events)


def ledger_process(
    broker: KafkaBroker, topic: str, group: str, database_url: str, *extra: str
) -> Awaitable[asyncio.subprocess.Process]:
    env = dict(os.environ)
    env["LLM_PROXY_KAFKA_IDEMPOTENCE"] = "true" if broker.supports_idempotence else "false"
    return asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "proxy", "ledger", "--json", "--group-id", group],
        *["--bootstrap", broker.bootstrap, "--topic", topic, "--database-url", database_url],
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def test_sigterm_stops_the_ledger_process_gracefully(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    ledger_engine: AsyncEngine,
    ledger_url: str,
    reader: Reader,
) -> None:
    events = random_charges(10, [401], seed=4)
    await send_events(producer, kafka_topic, events)
    group = f"ledger-{uuid.uuid4().hex[:8]}"
    port = free_port()
    listen = ["--listen", f"127.0.0.1:{port}"]
    proc = await ledger_process(kafka_broker, kafka_topic, group, ledger_url, *listen)
    try:
        deadline = time.monotonic() + WAIT_S
        while await entry_count(ledger_engine) < 10:
            assert proc.returncode is None, "ledger process exited early"
            assert time.monotonic() < deadline, "ledger process did not apply the events"
            await asyncio.sleep(0.1)
        # The same process serves the guard's snapshot provider from the books.
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/users/401/credit-snapshot") as resp,
        ):
            assert resp.status == 200
            expected = -sum(e.credits for e in events)
            assert await resp.json() == {"balance": expected, "is_blocked": True}
        # ... and the consumer's metrics: everything applied, nothing left behind.
        deadline = time.monotonic() + WAIT_S
        while True:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/metrics") as resp,
            ):
                assert resp.status == 200
                samples = {
                    (s.name, s.labels.get("result") or s.labels.get("partition")): s.value
                    for family in text_string_to_metric_families(await resp.text())
                    for s in family.samples
                }
            lags = [
                v for (name, _), v in samples.items() if name == "llm_ledger_consumer_lag_records"
            ]
            if lags and sum(lags) == 0:
                break
            assert time.monotonic() < deadline, f"lag never reached 0: {lags}"
            await asyncio.sleep(0.2)
        assert samples[("llm_ledger_events_total", "applied")] == 10
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert orjson.loads(out.splitlines()[-1])["applied"] == 10
    assert (await reader.account(401)).balance == -sum(e.credits for e in events)
    # It committed before leaving: the same group has nothing left to apply.
    ends = await end_offsets(kafka_broker.bootstrap, kafka_topic)
    assert await committed(kafka_broker.bootstrap, kafka_topic, group) == ends


async def test_a_ledger_started_before_kafka_waits_for_it(
    ledger_engine: AsyncEngine, ledger_url: str, reader: Reader
) -> None:
    """Compose starts everything at once: the consumer retries Kafka at start-up, as it
    does any later outage, instead of exiting with a traceback."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("needs a broker this test starts itself")
    broker = KafkaBroker()  # its port is chosen, the broker not started yet
    topic = f"late-{uuid.uuid4().hex[:8]}"
    proc = await ledger_process(broker, topic, f"ledger-{topic}", ledger_url)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + WAIT_S
        seen = b""
        while b"retrying" not in seen:
            assert time.monotonic() < deadline, seen.decode()
            line = await asyncio.wait_for(proc.stderr.readline(), WAIT_S)
            assert line, f"the ledger exited instead of waiting: {seen.decode()}"
            seen += line
        assert b"Traceback" not in seen
        assert f"Kafka at {broker.bootstrap}".encode() in seen
        broker.start()
        await create_topic(broker.bootstrap, topic, partitions=3, replication_factor=1)
        p = make_producer(broker.bootstrap, idempotent=broker.supports_idempotence)
        await p.start()
        try:
            events = random_charges(5, [451], seed=9)
            await send_events(p, topic, events)
        finally:
            await p.stop()
        while await entry_count(ledger_engine) < 5:
            assert proc.returncode is None, "ledger process exited"
            assert time.monotonic() < deadline, "the ledger never applied the events"
            await asyncio.sleep(0.1)
        assert (await reader.account(451)).balance == -sum(e.credits for e in events)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), WAIT_S)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        broker.close()


async def test_kill_9_mid_stream_loses_and_duplicates_nothing(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    ledger_engine: AsyncEngine,
    ledger_url: str,
    reader: Reader,
) -> None:
    users = [701, 702, 703]
    events = random_charges(3000, users, seed=9)
    group = f"ledger-{uuid.uuid4().hex[:8]}"
    await send_events(producer, kafka_topic, events[:1500])
    proc = await ledger_process(kafka_broker, kafka_topic, group, ledger_url, "--max-batch", "50")
    try:
        sender = asyncio.create_task(send_events(producer, kafka_topic, events[1500:]))
        deadline = time.monotonic() + WAIT_S
        while await entry_count(ledger_engine) < 200:  # in the middle of the stream
            assert proc.returncode is None, "ledger process exited early"
            assert time.monotonic() < deadline, "ledger process did not start applying"
            await asyncio.sleep(0.01)
        proc.kill()  # SIGKILL: no cleanup, whatever batch was in flight
        await proc.wait()
        await sender
        assert await entry_count(ledger_engine) < 3000
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    again = await ledger_process(kafka_broker, kafka_topic, group, ledger_url)
    try:
        deadline = time.monotonic() + WAIT_S
        while await entry_count(ledger_engine) < 3000:
            assert again.returncode is None, (await again.communicate())[1].decode()[-2000:]
            assert time.monotonic() < deadline, "restarted ledger did not catch up"
            await asyncio.sleep(0.1)
        again.send_signal(signal.SIGTERM)
        await asyncio.wait_for(again.communicate(), WAIT_S)
    finally:
        if again.returncode is None:
            again.kill()
            await again.wait()
    assert await entry_count(ledger_engine) == 3000
    assert await balances(reader, users) == expected_balances(0, users, events)


async def test_an_unmigrated_database_is_refused(
    kafka_broker: KafkaBroker, kafka_topic: str, ledger_url: str
) -> None:
    engine = open_engine(ledger_url)
    try:
        with pytest.raises(LedgerNotMigrated, match="llm-proxy ledger migrate"):
            await LedgerConsumer(settings(kafka_broker, kafka_topic), Book(engine)).run()
    finally:
        await engine.dispose()
    proc = await ledger_process(kafka_broker, kafka_topic, "g", ledger_url)
    _, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and "llm-proxy ledger migrate" in lines[-1]
    assert "Traceback" not in err.decode()


async def test_a_database_outage_holds_the_batch_until_it_is_back(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    ledger_url: str,
    ledger_engine: AsyncEngine,
    book: Book,
    reader: Reader,
    request: pytest.FixtureRequest,
) -> None:
    if not ledger_url.startswith("postgresql"):
        pytest.skip("an outage of an embedded SQLite file is not a thing")
    pg: PostgresServer = request.getfixturevalue("postgres_server")
    consumer = LedgerConsumer(settings(kafka_broker, kafka_topic), book)
    events = random_charges(5, [801], seed=8)
    task = asyncio.create_task(consumer.run())
    try:
        await send_events(producer, kafka_topic, events[:1])
        await wait_for(lambda: consumer.stats.applied == 1, task, "the first event")
        pg.stop()
        try:
            await send_events(producer, kafka_topic, events[1:])
            await wait_for(lambda: consumer.stats.retries > 0, task, "a failed attempt")
            assert consumer.stats.applied == 1
        finally:
            pg.start()
        await wait_for(lambda: consumer.stats.applied == 5, task, "the rest after the outage")
    finally:
        consumer.stop()
        await asyncio.wait_for(task, WAIT_S)
    assert (await reader.account(801)).balance == -sum(e.credits for e in events)


async def test_a_redis_outage_defers_the_projection_not_the_books(
    kafka_broker: KafkaBroker,
    kafka_topic: str,
    producer: AIOKafkaProducer,
    book: Book,
    reader: Reader,
    redis_server: RedisServer,
    redis_client: Redis,
    redis_prefix: str,
) -> None:
    projection = Projection(Redis.from_url(redis_server.url, socket_timeout=1), redis_prefix)
    consumer = LedgerConsumer(settings(kafka_broker, kafka_topic), book, projection)
    task = asyncio.create_task(consumer.run())
    try:
        redis_server.stop()  # unpersisted: it comes back empty
        try:
            await send_events(producer, kafka_topic, [charge_event(901, 5)])
            await wait_for(lambda: consumer.stats.applied == 1, task, "applied without Redis")
        finally:
            redis_server.start()
        assert (await reader.account(901)).balance == -5
        await send_events(producer, kafka_topic, [charge_event(902, 1)])
        await wait_for(lambda: consumer.stats.applied == 2, task, "the next event")
    finally:
        consumer.stop()
        await asyncio.wait_for(task, WAIT_S)
    # The next batch wrote the deferred user too.
    raw = await redis_client.get(RedisKeys(redis_prefix).snapshot(901))
    assert raw is not None and decode_snapshot(raw) == -5


async def wait_for(done: Callable[[], bool], task: asyncio.Task, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        if task.done():
            task.result()
            pytest.fail(f"consumer ended before {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
