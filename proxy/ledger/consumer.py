"""The ledger's Kafka consumer: charge events into the database of record.

Delivery is at-least-once (offsets are committed only after the transaction that
applied the records) and the effect exactly-once (the UNIQUE event_id: a crash
between commit and offset commit, a rebalance, a second consumer or a replay of the
whole topic re-applies nothing, with no time window). One transaction per polled
batch. Records that are not valid charge events, or that the database refuses,
go to a dead-letter topic with the reason and never hold up the records after
them. After each transaction the Redis projection of the users touched is
rewritten (proxy.ledger.projection); during a Redis outage it is deferred, not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from proxy.contract.charge_event import ChargeEvent
from proxy.delivery.kafka import create_topic, make_producer
from proxy.ledger.batches import Applied, apply_isolating
from proxy.ledger.book import Book, check_event
from proxy.ledger.database import is_transient, require_migrated
from proxy.ledger.metrics import LedgerMetrics
from proxy.ledger.projection import Projection, ProjectionBacklog, releases_of

log = logging.getLogger(__name__)

_Client = TypeVar("_Client", AIOKafkaConsumer, AIOKafkaProducer)

DEFAULT_GROUP_ID = "llm-proxy-ledger"
MAX_REASON_CHARS = 1000
MAX_RETRY_BACKOFF_S = 10.0


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    topic: str
    bootstrap: str
    group_id: str = DEFAULT_GROUP_ID
    dlq_topic: str | None = None  # None = "<topic>.dlq"
    # aiokafka's default; tansu (the test broker) rejects idempotent producers.
    idempotent_producer: bool = True
    max_batch: int = 1000
    poll_timeout_ms: int = 500
    retry_backoff_s: float = 0.5
    # Group membership timing (aiokafka's defaults). Tansu makes a (re)joining member
    # wait about a rebalance timeout, and after a crash the dead member's session,
    # so tests shorten both.
    session_timeout_ms: int = 10_000
    rebalance_timeout_ms: int | None = None

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"


# Called after a batch was applied and before its offsets are committed; tests use
# it to simulate a crash in exactly that window.
BatchHook = Callable[[Sequence[ConsumerRecord]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class LedgerStats:
    applied: int
    duplicates: int
    dead_lettered: int
    retries: int  # failed attempts against the database or Kafka (retried until they work)


class LedgerConsumer:
    """The consumer loop: poll a batch, dead-letter the poison records, apply the rest
    in one transaction, project, then commit the offsets. `run()` returns after
    `stop()`; the batch in hand is finished and committed first."""

    def __init__(
        self,
        settings: LedgerSettings,
        book: Book,
        projection: Projection | None = None,
        *,
        before_commit: BatchHook | None = None,
        metrics: LedgerMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._book = book
        self._backlog = None if projection is None else ProjectionBacklog(projection)
        self._before_commit = before_commit
        self._stopping = asyncio.Event()
        self._applied = 0
        self._duplicates = 0
        self._dead_lettered = 0
        self._retries = 0

    @property
    def stats(self) -> LedgerStats:
        return LedgerStats(self._applied, self._duplicates, self._dead_lettered, self._retries)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Raises LedgerNotMigrated before touching Kafka on an unmigrated database."""
        await require_migrated(self._book.engine)
        s = self._settings
        # Kafka may not be up yet (compose starts everything at once): waited for,
        # like any later outage, instead of exiting.
        producer = await self._started(
            lambda: make_producer(s.bootstrap, idempotent=s.idempotent_producer)
        )
        if producer is None:
            return
        try:
            await self._ensure_dead_letter_topic()
            consumer = await self._started(self._new_consumer)
            if consumer is None:
                return
            try:
                await self._loop(consumer, producer)
            finally:
                await consumer.stop()
        finally:
            await producer.stop()

    def _new_consumer(self) -> AIOKafkaConsumer:
        s = self._settings
        return AIOKafkaConsumer(
            s.topic,
            bootstrap_servers=s.bootstrap,
            group_id=s.group_id,
            enable_auto_commit=False,
            # A new group starts from the beginning: replays are harmless, gaps are not.
            auto_offset_reset="earliest",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(100, s.session_timeout_ms // 3),
            rebalance_timeout_ms=s.rebalance_timeout_ms,
        )

    async def _started(self, make: Callable[[], _Client]) -> _Client | None:
        """A started Kafka client, retrying until the broker answers; None: stopped first.

        A client whose start failed is closed and a fresh one made: aiokafka clients
        are not restartable."""
        clients: list[_Client] = []

        async def start() -> None:
            client = make()
            try:
                await client.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.stop()
                raise
            clients.append(client)

        if not await self._retry(start, what=f"Kafka at {self._settings.bootstrap}"):
            return None
        return clients[0]

    async def _ensure_dead_letter_topic(self) -> None:
        # Brokers often have topic auto-creation off; a missing DLQ would stall the
        # consumer on the first poison message. Best effort: lacking the ACL to create
        # topics is fine when an operator created it.
        s = self._settings
        try:
            await create_topic(s.bootstrap, s.dead_letter_topic, partitions=1)
        except (KafkaError, OSError) as exc:
            log.warning("ledger: cannot create %s (%s)", s.dead_letter_topic, exc)

    async def _loop(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        s = self._settings
        while not self._stopping.is_set():
            batches = await consumer.getmany(timeout_ms=s.poll_timeout_ms, max_records=s.max_batch)
            if not batches:
                if self._backlog is not None and self._backlog.pending:
                    await self._backlog.write({})  # Redis may be back: no need to wait
                await self._measure(consumer)
                continue
            records = [r for rs in batches.values() for r in rs]
            if not await self._handle(records, producer):
                # Stop requested while the database/Redis/Kafka is down: nothing of
                # this batch is committed; it is redelivered (and deduplicated).
                return
            if self._before_commit is not None:
                await self._before_commit(records)
            offsets = {tp: rs[-1].offset + 1 for tp, rs in batches.items() if rs}
            await self._commit(consumer, offsets)
            if self._metrics is not None:
                # The record timestamp: when the proxy's outbox published the charge.
                self._metrics.batch_applied(max(r.timestamp for r in records))
            await self._measure(consumer)

    async def _measure(self, consumer: AIOKafkaConsumer) -> None:
        m = self._metrics
        if m is None:
            return
        if self._backlog is not None:
            m.projection_backlog.set(self._backlog.pending)
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:  # no fetch answered for it yet
                continue
            try:
                position = await consumer.position(tp)
            except KafkaError:
                continue
            m.lag.labels(str(tp.partition)).set(max(0, highwater - position))

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # Typically a rebalance took the partitions away. Whoever owns them now
            # gets these records again, and the unique event ids make that harmless.
            log.warning("ledger: commit failed (%s); records will be redelivered", exc)

    async def _handle(self, records: Sequence[ConsumerRecord], producer: AIOKafkaProducer) -> bool:
        """Apply or dead-letter every record, retrying infrastructure errors until it
        worked (True) or a stop was requested (False)."""
        good: list[tuple[ConsumerRecord, ChargeEvent]] = []
        for record in records:
            try:
                event = ChargeEvent.from_json(record.value or b"")
                check_event(event)
            except ValueError as exc:
                if not await self._dead_letter(record, str(exc), producer):
                    return False
                continue
            good.append((record, event))
        if not good:
            return True
        outcome: list[Applied] = []

        async def apply() -> None:
            outcome.append(await apply_isolating(self._book, [e for _, e in good]))

        if not await self._retry(apply):
            return False
        result = outcome[-1]
        self._applied += result.applied
        self._duplicates += result.duplicates
        if self._metrics is not None:
            self._metrics.events.labels("applied").inc(result.applied)
            self._metrics.events.labels("duplicate").inc(result.duplicates)
        for record, event in good:
            why = result.refused.get(event.event_id)
            if why is not None and not await self._dead_letter(record, why, producer):
                return False
        await self._project(result, [event for _, event in good])
        return True

    async def _project(self, result: Applied, events: list[ChargeEvent]) -> None:
        # A Redis outage must not stop the books: what could not be written waits
        # for the next batch (the guard fails open meanwhile). The holds of the
        # batch's requests go in the same script as their users' new balances.
        if self._backlog is not None:
            await self._backlog.write(result.balances, releases_of(events))

    async def _dead_letter(
        self, record: ConsumerRecord, reason: str, producer: AIOKafkaProducer
    ) -> bool:
        # The original bytes travel unchanged (they may not even be UTF-8); the why
        # and where-from go in headers so the DLQ can be inspected and replayed.
        headers = [
            *(record.headers or ()),
            ("dlq_reason", reason[:MAX_REASON_CHARS].encode()),
            ("dlq_source_topic", record.topic.encode()),
            ("dlq_source_partition", str(record.partition).encode()),
            ("dlq_source_offset", str(record.offset).encode()),
        ]

        async def send() -> None:
            await producer.send_and_wait(
                self._settings.dead_letter_topic, record.value, key=record.key, headers=headers
            )

        if not await self._retry(send):
            return False
        self._dead_lettered += 1
        if self._metrics is not None:
            self._metrics.events.labels("dead_lettered").inc()
        log.warning(
            "ledger: %s[%d]@%d dead-lettered: %s",
            record.topic,
            record.partition,
            record.offset,
            reason[:200],
        )
        return True

    async def _retry(self, op: Callable[[], Awaitable[None]], what: str = "") -> bool:
        # Skipping a charge would lose money and stopping the consumer would stall
        # billing, so infrastructure errors are retried until they clear.
        backoff = self._settings.retry_backoff_s
        while True:
            try:
                await op()
                return True
            except (SQLAlchemyError, RedisError, KafkaError, OSError, TimeoutError) as exc:
                if isinstance(exc, SQLAlchemyError) and not is_transient(exc):
                    raise  # a bug, not an outage: apply_isolating handled the data
                # Messages of these errors carry no secrets (no prompt text, no keys).
                where = f"{what}: " if what else ""
                log.warning(
                    "ledger: %s%s: %s; retrying in %.1f s", where, type(exc).__name__, exc, backoff
                )
                self._retries += 1
                if self._metrics is not None:
                    self._metrics.retries.inc()
            if self._stopping.is_set():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, MAX_RETRY_BACKOFF_S)


async def run_ledger(
    settings: LedgerSettings,
    book: Book,
    projection: Projection | None,
    metrics: LedgerMetrics | None = None,
) -> LedgerStats:
    """Run until SIGTERM/SIGINT; used by `llm-proxy ledger`."""
    consumer = LedgerConsumer(settings, book, projection, metrics=metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, consumer.stop)
    try:
        await consumer.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return consumer.stats
