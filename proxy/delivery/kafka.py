"""Kafka edge: producer settings, the outbox's Kafka sink, topic creation. The wire
format of events is not decided here: rows arrive already serialised from the outbox."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import BrokerResponseError, KafkaError, TopicAlreadyExistsError

from proxy.delivery.outbox import OutboxRow
from proxy.errors import ConfigError

EVENT_ID_HEADER = "event_id"
COMPRESSIONS = ("gzip", "snappy", "lz4", "zstd")
_TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code


def producer_config(
    bootstrap: str,
    *,
    idempotent: bool,
    linger_ms: int = 5,
    compression: str | None = None,
    request_timeout_ms: int = 10_000,
    client_id: str = "llm-proxy",
) -> dict[str, Any]:
    """Keyword arguments for `AIOKafkaProducer`.

    acks=all: a row leaves the outbox only when every in-sync replica has it.
    linger_ms: the publisher sends whole batches, a few ms lets them share requests.
    request_timeout_ms bounds how long a send to a dead broker hangs before the publisher
    sees the failure and backs off (aiokafka's default, 40 s, is long for that).
    """
    if compression is not None and compression not in COMPRESSIONS:
        raise ConfigError(f"kafka.compression: must be one of {COMPRESSIONS}, got {compression!r}")
    if linger_ms < 0 or request_timeout_ms <= 0:
        raise ConfigError("kafka: linger_ms must be >= 0 and request_timeout_ms > 0")
    return {
        "bootstrap_servers": bootstrap,
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": idempotent,
        "linger_ms": linger_ms,
        "compression_type": compression,
        "request_timeout_ms": request_timeout_ms,
        "retry_backoff_ms": 200,
    }


def make_producer(
    bootstrap: str,
    *,
    idempotent: bool,
    linger_ms: int = 5,
    compression: str | None = None,
    request_timeout_ms: int = 10_000,
) -> AIOKafkaProducer:
    """An unstarted producer; `KafkaSink` starts it (and retries the start)."""
    return AIOKafkaProducer(
        **producer_config(
            bootstrap,
            idempotent=idempotent,
            linger_ms=linger_ms,
            compression=compression,
            request_timeout_ms=request_timeout_ms,
        )
    )


class KafkaSink:
    """Outbox sink: sends a batch and returns only when every record is acked.

    The producer is started lazily inside `send_batch`, so a broker that is down
    when the app starts is just a failed batch the publisher retries with backoff.
    Any failed record fails the whole batch; the re-send duplicates only records
    with the same `event_id` (also sent as a header), which consumers deduplicate.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        *,
        send_timeout: float = 30.0,
        idempotence_hint: str | None = None,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._send_timeout = send_timeout
        # For an idempotent producer: what to tell the operator when the broker refuses
        # to hand out a producer id (brokers without idempotence answer UnknownError).
        self._idempotence_hint = idempotence_hint
        self._started = False

    async def send_batch(self, rows: Sequence[OutboxRow]) -> None:
        if not self._started:
            try:
                await self._producer.start()
            except BrokerResponseError as exc:
                if self._idempotence_hint is None:
                    raise
                raise KafkaError(
                    f"{exc!r} while starting an idempotent producer: the broker may not "
                    f"support idempotent producers ({self._idempotence_hint})"
                ) from exc
            self._started = True
        futures: list[asyncio.Future[Any]] = []
        try:
            for row in rows:
                futures.append(
                    await self._producer.send(
                        self._topic,
                        value=row.payload,
                        key=row.key,
                        headers=[(EVENT_ID_HEADER, row.event_id.encode())],
                    )
                )
            # asyncio.wait, not gather/wait_for: it never cancels the delivery futures
            # (they belong to aiokafka) and it lets us look at every outcome.
            done, pending = await asyncio.wait(futures, timeout=self._send_timeout)
        except BaseException:
            for fut in futures:
                fut.add_done_callback(_consume_result)
            raise
        for fut in pending:  # they finish later; retrieve so nothing logs "never retrieved"
            fut.add_done_callback(_consume_result)
        # Look at every outcome (retrieving it) before raising the first failure.
        errors = [_failure(fut) for fut in done]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(rows)} records not acknowledged")

    async def close(self) -> None:
        # Also after a failed start(): aiokafka warns about an unclosed producer else.
        self._started = False
        await self._producer.stop()


def _failure(fut: asyncio.Future[Any]) -> BaseException | None:
    if fut.cancelled():
        return KafkaError("delivery cancelled (producer stopping)")
    return fut.exception()


def _consume_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def create_topic(
    bootstrap: str,
    topic: str,
    partitions: int = 3,
    replication_factor: int = 1,
    *,
    request_timeout_ms: int = 10_000,
) -> bool:
    """Create `topic`; True if created, False if it already existed. Raises KafkaError
    (e.g. KafkaConnectionError when no broker answers) on anything else."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        try:
            response = await admin.create_topics([NewTopic(topic, partitions, replication_factor)])
        except TopicAlreadyExistsError:  # some aiokafka versions raise instead
            return False
        for name, code, *rest in response.topic_errors:
            if name != topic or code == 0:
                continue
            if code == _TOPIC_ALREADY_EXISTS:
                return False
            message = rest[0] if rest else None
            raise KafkaError(f"create topic {topic!r} failed: error {code} {message or ''}".strip())
        return True
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
