"""The embedded ledger: without Kafka, the proxy's outbox publisher hands its
batches to `LedgerSink`, which applies them to the database of record with the
same code and the same idempotency as the Kafka consumer (an outbox row re-sent
after a crash is a duplicate). So one box with no Kafka and no Redis still has
debits, blocks (the guard asks `EmbeddedLedger.fetch`) and history.

Events it cannot apply go to the `dead_letters` table and never hold up the rest.
The embedded ledger migrates its own database at start (the Kafka consumer, a
separate deployment, refuses an unmigrated one instead).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.config import EnvSettings
from proxy.contract.charge_event import ChargeEvent
from proxy.delivery.outbox import OutboxRow
from proxy.ledger.batches import apply_isolating
from proxy.ledger.book import Book, check_event
from proxy.ledger.database import migrate, open_engine
from proxy.ledger.projection import Projection, ProjectionBacklog, releases_of
from proxy.ledger.reads import Account, Reader
from proxy.ledger.schema import dead_letters

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 1000


class LedgerSink:
    """A publisher sink (proxy.delivery.publisher.Sink) that is the ledger itself."""

    def __init__(self, engine: AsyncEngine, projection: Projection | None) -> None:
        self._engine = engine
        self._book = Book(engine)
        self._backlog = None if projection is None else ProjectionBacklog(projection)
        self.on_applied: Callable[[Mapping[int, Iterable[str]]], None] | None = None
        self.applied = 0
        self.duplicates = 0
        self.dead_lettered = 0

    async def send_batch(self, rows: Sequence[OutboxRow]) -> None:
        """Returns once every row is applied or dead-lettered; a database failure
        raises, and the publisher re-sends the batch (duplicates are skipped)."""
        events: list[ChargeEvent] = []
        dead: list[tuple[bytes, str]] = []
        payloads: dict[str, bytes] = {}
        for row in rows:
            try:
                event = ChargeEvent.from_json(row.payload)
                check_event(event)
            except ValueError as exc:
                dead.append((row.payload, str(exc)))
                continue
            events.append(event)
            payloads[event.event_id] = row.payload
        result = await apply_isolating(self._book, events)
        dead += [(payloads[eid], why) for eid, why in result.refused.items()]
        if dead:
            await self._dead_letter(dead)
        releases = releases_of(events)
        if self._backlog is not None:
            # A Redis outage defers it; the holds go with the balances they debit.
            await self._backlog.write(result.balances, releases)
        if self.on_applied is not None:
            self.on_applied(releases)  # in-process holds (the guard without Redis)
        self.applied += result.applied
        self.duplicates += result.duplicates

    async def _dead_letter(self, dead: list[tuple[bytes, str]]) -> None:
        insert = postgresql.insert if self._engine.dialect.name == "postgresql" else sqlite.insert
        now = datetime.now(UTC)
        values = [
            {
                "digest": hashlib.sha256(payload).hexdigest(),
                "payload": payload,
                "reason": reason[:MAX_REASON_CHARS],
                "source": "outbox",
                "created_at": now,
            }
            for payload, reason in dead
        ]
        async with self._engine.begin() as conn:
            await conn.execute(insert(dead_letters).on_conflict_do_nothing(), values)
        self.dead_lettered += len(dead)
        for _, reason in dead:
            log.warning("embedded ledger: event dead-lettered: %s", reason[:200])

    async def close(self) -> None:
        return None


class EmbeddedLedger:
    """What the proxy process owns in embedded mode: the sink and the balance source
    of its guard when there is no Redis."""

    def __init__(self, engine: AsyncEngine, projection: Projection | None) -> None:
        self._engine = engine
        self._reader = Reader(engine)
        self.sink = LedgerSink(engine, projection)
        self.description = f"embedded ledger ({engine.dialect.name})"

    async def fetch(self, user_id: int) -> Account:
        return await self._reader.account(user_id)

    def on_applied(self, callback: Callable[[Mapping[int, Iterable[str]]], None]) -> None:
        self.sink.on_applied = callback

    async def close(self) -> None:
        await self._engine.dispose()


async def open_embedded_ledger(
    settings: EnvSettings, prefix: str, redis: Redis | RedisCluster | None
) -> EmbeddedLedger:
    engine = open_engine(settings.ledger_database_url)
    try:
        before, after = await migrate(engine)
    except BaseException:
        await engine.dispose()
        raise
    if before != after:
        log.info("embedded ledger: database migrated to schema %d", after)
    return EmbeddedLedger(engine, None if redis is None else Projection(redis, prefix))
