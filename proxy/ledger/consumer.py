"""The reference ledger: consume charge events from Kafka and apply them to Redis.

Delivery is at-least-once (offsets are committed only after the events they cover
were applied) and the apply step is idempotent (one Lua script checks and sets the
`credit:applied:<event_id>` marker together with the debit), so a crash between
applying and committing, a rebalance or a full replay of the topic never debits
twice within the marker window (default 7 days). Messages that are not valid charge
events go to a dead-letter topic with the reason and never stop the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.contract.charge_event import ChargeEvent
from proxy.contract.payers import check_user_id
from proxy.contract.redis_keys import DEFAULT_PREFIX, SNAPSHOT_LUA
from proxy.contract.timestamps import utc_now_iso
from proxy.delivery.kafka import create_topic, make_producer
from proxy.ledger.store import (
    DEFAULT_APPLIED_TTL_S,
    DEFAULT_BLOCKED_TTL_S,
    DEFAULT_STREAM_MAXLEN,
    BalanceChange,
    LedgerWriter,
    check_limits,
)

log = logging.getLogger(__name__)

DEFAULT_GROUP_ID = "llm-proxy-ledger"
MAX_REASON_CHARS = 1000
MAX_RETRY_BACKOFF_S = 10.0

# KEYS: balance, ledger, snapshot, blocked, applied
# ARGV: credits, event_id, now, maxlen, applied_ttl, request_id, blocked_ttl
# Returns {applied (1/0), balance}. The marker check and the debit are one script,
# so no interleaving (another ledger instance after a rebalance) can debit twice.
CHARGE_LUA = (
    """
if redis.call('EXISTS', KEYS[5]) == 1 then
  return {0, tonumber(redis.call('GET', KEYS[1]) or '0')}
end
local bal = redis.call('DECRBY', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'kind', 'charge',
  'amount', ARGV[1], 'balance_after', bal, 'event_id', ARGV[2],
  'request_id', ARGV[6], 'at', ARGV[3])
"""
    + SNAPSHOT_LUA
    + """
if bal <= 0 then
  if tonumber(ARGV[7]) > 0 then
    redis.call('SET', KEYS[4], 'balance', 'EX', ARGV[7])
  else
    redis.call('SET', KEYS[4], 'balance')
  end
end
redis.call('SET', KEYS[5], bal, 'EX', ARGV[5])
return {1, bal}
"""
)


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    topic: str
    bootstrap: str
    group_id: str = DEFAULT_GROUP_ID
    dlq_topic: str | None = None  # None = "<topic>.dlq"
    prefix: str = DEFAULT_PREFIX
    stream_maxlen: int = DEFAULT_STREAM_MAXLEN
    applied_ttl_s: int = DEFAULT_APPLIED_TTL_S
    blocked_ttl_s: int = DEFAULT_BLOCKED_TTL_S
    # aiokafka's default; tansu (the test broker) rejects idempotent producers.
    idempotent_producer: bool = True
    max_batch: int = 500
    poll_timeout_ms: int = 500
    retry_backoff_s: float = 0.5
    # Group membership timing (aiokafka's defaults). Tansu makes a (re)joining member
    # wait about a rebalance timeout, and after a crash the dead member's session,
    # so tests shorten both.
    session_timeout_ms: int = 10_000
    rebalance_timeout_ms: int | None = None

    def __post_init__(self) -> None:
        check_limits(self.stream_maxlen, self.applied_ttl_s, self.blocked_ttl_s)

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"


class ChargeApplier(LedgerWriter):
    """Applies one charge event to Redis, idempotently."""

    SCRIPT = CHARGE_LUA

    async def apply(self, event: ChargeEvent) -> BalanceChange:
        k, uid = self.keys, event.user_id
        res = await self._script(
            keys=[
                k.balance(uid),
                k.ledger(uid),
                k.snapshot(uid),
                k.blocked(uid),
                k.applied(event.event_id),
            ],
            args=[
                event.credits,
                event.event_id,
                utc_now_iso(),
                self._stream_maxlen,
                self._applied_ttl_s,
                event.request_id or "",
                self._blocked_ttl_s,
            ],
        )
        return BalanceChange(applied=bool(res[0]), balance=int(res[1]))


# Called after a batch was applied and before its offsets are committed; tests use
# it to simulate a crash in exactly that window.
BatchHook = Callable[[Sequence[ConsumerRecord]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class LedgerStats:
    applied: int
    duplicates: int
    dead_lettered: int
    retries: int  # failed attempts against Redis/Kafka (each retried until it works)


class LedgerConsumer:
    """The consumer loop: poll a batch, apply every record, dead-letter poison
    records, then commit. `run()` returns after `stop()`; the batch in hand is
    finished and committed first."""

    def __init__(
        self,
        settings: LedgerSettings,
        redis: Redis,
        *,
        before_commit: BatchHook | None = None,
    ) -> None:
        self._settings = settings
        self._applier = ChargeApplier(
            redis,
            prefix=settings.prefix,
            stream_maxlen=settings.stream_maxlen,
            applied_ttl_s=settings.applied_ttl_s,
            blocked_ttl_s=settings.blocked_ttl_s,
        )
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
        s = self._settings
        consumer = AIOKafkaConsumer(
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
        producer = make_producer(s.bootstrap, idempotent=s.idempotent_producer)
        await self._ensure_dead_letter_topic()
        await producer.start()
        try:
            await consumer.start()
            try:
                await self._loop(consumer, producer)
            finally:
                await consumer.stop()
        finally:
            await producer.stop()

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
                continue
            offsets: dict[TopicPartition, int] = {}
            done: list[ConsumerRecord] = []
            interrupted = False
            for tp, records in batches.items():
                for record in records:
                    if not await self._handle(record, producer):
                        # Stop requested while Redis/Kafka is down: this record and
                        # the rest stay uncommitted and are redelivered next time.
                        interrupted = True
                        break
                    offsets[tp] = record.offset + 1
                    done.append(record)
                if interrupted:
                    break
            if self._before_commit is not None:
                await self._before_commit(done)
            if offsets:
                await self._commit(consumer, offsets)
            if interrupted:
                return

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # Typically a rebalance took the partitions away. Whoever owns them now
            # gets these records again, and the applied markers make that harmless.
            log.warning("ledger: commit failed (%s); records will be redelivered", exc)

    async def _handle(self, record: ConsumerRecord, producer: AIOKafkaProducer) -> bool:
        """Apply or dead-letter one record, retrying infrastructure errors until it
        worked (True) or a stop was requested (False)."""
        try:
            event = ChargeEvent.from_json(record.value or b"")
            # The schema allows any integer; a balance needs a billable user.
            check_user_id(event.user_id)
        except ValueError as exc:
            reason = str(exc)
            return await self._retry(lambda: self._dead_letter(record, reason, producer))
        return await self._retry(lambda: self._apply(event))

    async def _apply(self, event: ChargeEvent) -> None:
        change = await self._applier.apply(event)
        if change.applied:
            self._applied += 1
        else:
            self._duplicates += 1
            log.info("ledger: duplicate event %s skipped", event.event_id)

    async def _dead_letter(
        self, record: ConsumerRecord, reason: str, producer: AIOKafkaProducer
    ) -> None:
        # The original bytes travel unchanged (they may not even be UTF-8); the why
        # and where-from go in headers so the DLQ can be inspected and replayed.
        headers = [
            *(record.headers or ()),
            ("dlq_reason", reason[:MAX_REASON_CHARS].encode()),
            ("dlq_source_topic", record.topic.encode()),
            ("dlq_source_partition", str(record.partition).encode()),
            ("dlq_source_offset", str(record.offset).encode()),
        ]
        await producer.send_and_wait(
            self._settings.dead_letter_topic, record.value, key=record.key, headers=headers
        )
        self._dead_lettered += 1
        log.warning(
            "ledger: %s[%d]@%d dead-lettered: %s",
            record.topic,
            record.partition,
            record.offset,
            reason[:200],
        )

    async def _retry(self, op: Callable[[], Awaitable[None]]) -> bool:
        # Skipping a charge would lose money and stopping the consumer would stall
        # billing, so infrastructure errors are retried until they clear.
        backoff = self._settings.retry_backoff_s
        while True:
            try:
                await op()
                return True
            except (RedisError, KafkaError, OSError, TimeoutError) as exc:
                # Messages of these errors carry no secrets (no prompt text, no keys).
                log.warning("ledger: %s: %s; retrying", type(exc).__name__, exc)
                self._retries += 1
            if self._stopping.is_set():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, MAX_RETRY_BACKOFF_S)


async def run_ledger(settings: LedgerSettings, redis: Redis) -> LedgerStats:
    """Run until SIGTERM/SIGINT; used by `llm-proxy ledger`."""
    consumer = LedgerConsumer(settings, redis)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, consumer.stop)
    try:
        await consumer.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return consumer.stats
