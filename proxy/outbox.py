"""Durable outbox: charge events are committed to SQLite before anyone is told "done",
then a relay publishes them (Kafka or a JSON-lines sink) and deletes them only after
the publisher acknowledged. No charge is ever lost; a crash between publish and delete
re-sends the row with the same `event_id` (consumers are idempotent on it).

Write path (`put`): the handler appends to an in-memory buffer and awaits a future.
Everything buffered during one event-loop iteration is committed in ONE transaction
right after it (group commit): batches grow with load by themselves.

The SQLite work runs inline on the event loop, on purpose. In WAL mode with
`synchronous=NORMAL` a commit is a write() into the page cache (~15 µs CPU),
while handing it to a thread cost ~100 µs CPU per commit in thread wake-ups
(measured: sparse traffic commits one request at a time). Durability: a commit
survives a crash of the process at once; against power loss the WAL is fsynced by
a checkpoint on a background thread every `checkpoint_interval` seconds (default
1 s), which bounds what an OS crash can lose. WAL auto-checkpoints are off so no
fsync ever runs on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    key BLOB NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL
)
"""
_HEAD = "SELECT created_at FROM outbox ORDER BY seq LIMIT 1"


# Events kept in memory while commits fail (disk full): beyond this, the oldest go.
_MAX_UNCOMMITTED = 100_000
_COMMIT_RETRY_MAX_S = 5.0


class OutboxClosedError(RuntimeError):
    """The outbox no longer accepts events (it is closing or closed)."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    event_id: str
    key: bytes
    payload: bytes
    created_at: float


@dataclass(frozen=True, slots=True)
class OutboxStats:
    commits: int  # write transactions (group commits) since start
    events_committed: int
    pending: int


class Publisher(Protocol):
    async def send_batch(self, rows: Sequence[OutboxRow]) -> None:
        """Return only once every row is acknowledged; raise if any was not."""

    async def close(self) -> None: ...


class Outbox:
    """Embedded durable store (SQLite, WAL). Create, `await start()`, then `put()`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_interval: float = 0.0,
        checkpoint_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if flush_interval < 0 or checkpoint_interval <= 0:
            raise ValueError("need flush_interval >= 0 and checkpoint_interval > 0")
        self.path = Path(path)
        # > 0: linger that long for more puts before committing (fewer, larger commits).
        self._flush_interval = flush_interval
        self._checkpoint_interval = checkpoint_interval
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._buffer: list[tuple[str, bytes, bytes, float, asyncio.Future[None]]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._committed = asyncio.Event()  # rows became visible to the relay
        self._checkpointer: asyncio.Task[None] | None = None
        self._dirty = False  # commits since the last checkpoint
        self._accepting = False
        self._pending = 0
        self._commit_failures = 0
        self._oldest: float | None = None
        self._commits = 0
        self._events_committed = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or create) the file, count leftovers, start checkpointing."""
        self._pending, self._oldest = self._db_open()
        self._accepting = True
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="outbox-ckpt")
        if self._pending:
            self._committed.set()  # leftovers from a previous run: wake the relay

    async def seal(self) -> None:
        """Stop accepting new events and commit everything already queued."""
        self._accepting = False
        for _ in range(3):  # a failing disk gets a few more tries, then we give up
            if not self._buffer or self._conn is None:
                break
            self._flush()
            if self._buffer:
                await asyncio.sleep(0.05)
        if self._buffer:
            log.error("outbox closing with %d uncommitted events", len(self._buffer))

    async def close(self) -> None:
        """Seal, checkpoint, then close the file. Unpublished rows stay for the next start."""
        await self.seal()
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                await asyncio.to_thread(self._checkpoint)
                self._conn.close()
            self._conn = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    # -- write path -------------------------------------------------------------------

    def put_nowait(self, event_id: str, key: bytes, payload: bytes) -> asyncio.Future[None]:
        """Enqueue; the future resolves once the event is committed to the file."""
        if not self._accepting:
            raise OutboxClosedError("outbox is not accepting events")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._buffer.append((event_id, key, payload, self._clock(), fut))
        if self._flush_handle is None:
            self._flush_handle = (
                loop.call_later(self._flush_interval, self._flush)
                if self._flush_interval
                else loop.call_soon(self._flush)
            )
        return fut

    async def put(self, event_id: str, key: bytes, payload: bytes) -> None:
        # A cancelled waiter does not un-queue the event: it is committed regardless.
        await self.put_nowait(event_id, key, payload)

    def _flush(self) -> None:
        """Commit everything buffered in one transaction (a loop callback)."""
        self._flush_handle = None
        if not self._buffer or self._conn is None:
            return
        batch, self._buffer = self._buffer, []
        try:
            inserted, oldest = self._db_insert([item[:4] for item in batch])
        except Exception as exc:  # disk full, I/O error: every waiter must hear it
            log.error("outbox commit of %d events failed: %r", len(batch), exc)
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            # The events stay in memory, ahead of newer ones, and are retried with
            # backoff rather than dropped.
            self._buffer[:0] = batch[-_MAX_UNCOMMITTED:]
            if len(batch) > _MAX_UNCOMMITTED:
                log.error("outbox dropped %d uncommittable events", len(batch) - _MAX_UNCOMMITTED)
            self._commit_failures += 1
            if self._accepting:
                delay = min(_COMMIT_RETRY_MAX_S, 0.05 * 2**self._commit_failures)
                self._flush_handle = asyncio.get_running_loop().call_later(delay, self._flush)
            return
        self._commit_failures = 0
        self._commits += 1
        self._events_committed += inserted
        self._pending += inserted
        self._oldest = oldest
        self._dirty = True
        for *_, fut in batch:
            if not fut.done():  # the waiter may have been cancelled
                fut.set_result(None)
        if inserted:
            self._committed.set()

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self._checkpoint_interval)
            if self._dirty:
                self._dirty = False
                try:
                    await asyncio.to_thread(self._checkpoint)
                except sqlite3.Error as exc:
                    log.warning("outbox checkpoint failed: %r", exc)

    def _checkpoint(self) -> None:
        """fsync the WAL and copy it into the database file (a thread of its own,
        with its own connection: the loop's writes go on meanwhile)."""
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    # -- read side (relay) ----------------------------------------------------------

    @property
    def commit_signal(self) -> asyncio.Event:
        """Set after every commit that added rows. The (single) relay clears it before
        reading, so a commit landing while it publishes is never slept through."""
        return self._committed

    async def fetch_pending(self, limit: int) -> list[OutboxRow]:
        """The oldest `limit` rows, in commit (seq) order."""
        return self._db_fetch(limit)

    async def delete(self, rows: Sequence[OutboxRow]) -> None:
        """Forget rows the publisher acknowledged."""
        if not rows:
            return
        deleted, oldest = self._db_delete([(r.seq,) for r in rows])
        self._pending -= deleted
        self._oldest = oldest
        self._dirty = True

    def pending_count(self) -> int:
        """Committed events not yet published."""
        return self._pending

    def queued_count(self) -> int:
        """Events handed to `put` and not yet committed to the file."""
        return len(self._buffer)

    def oldest_pending_age(self) -> float | None:
        """Seconds since the oldest unpublished event was put, None when empty."""
        if self._oldest is None:
            return None
        return max(0.0, self._clock() - self._oldest)

    def stats(self) -> OutboxStats:
        return OutboxStats(self._commits, self._events_committed, self._pending)

    # -- SQLite (on the loop thread; see the module docstring) -------------------------

    def _db_open(self) -> tuple[int, float | None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per batch.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run off the loop
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute(_SCHEMA)
        self._conn = conn
        (count,) = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count), self._db_head()

    def _db_head(self) -> float | None:
        assert self._conn is not None
        row = self._conn.execute(_HEAD).fetchone()
        return None if row is None else float(row[0])

    def _db_insert(self, rows: list[tuple[str, bytes, bytes, float]]) -> tuple[int, float | None]:
        conn = self._conn
        assert conn is not None
        before = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            # OR IGNORE: a re-put of an event_id still pending is the same charge.
            conn.executemany(
                "INSERT OR IGNORE INTO outbox (event_id, key, payload, created_at)"
                " VALUES (?, ?, ?, ?)",
                rows,
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        inserted = conn.total_changes - before
        # Inserts append: the oldest pending row only changes when there was none.
        if self._oldest is not None or not inserted:
            return inserted, self._oldest
        return inserted, self._db_head()

    def _db_fetch(self, limit: int) -> list[OutboxRow]:
        if self._conn is None:
            raise OutboxClosedError("outbox is closed")
        cur = self._conn.execute(
            "SELECT seq, event_id, key, payload, created_at FROM outbox ORDER BY seq LIMIT ?",
            (limit,),
        )
        return [OutboxRow(s, e, bytes(k), bytes(p), c) for s, e, k, p, c in cur]

    def _db_delete(self, seqs: list[tuple[int]]) -> tuple[int, float | None]:
        conn = self._conn
        if conn is None:
            raise OutboxClosedError("outbox is closed")
        before = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("DELETE FROM outbox WHERE seq = ?", seqs)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return conn.total_changes - before, self._db_head()


class OutboxRelay:
    """Publishes committed rows in seq order; deletes them only after the ack.

    While the publisher fails the batch is retried with capped exponential backoff
    plus jitter; nothing is dropped. Counters are plain ints (`published`,
    `publish_failed`, in events) and the optional callbacks receive the same deltas.
    """

    def __init__(
        self,
        outbox: Outbox,
        publisher: Publisher,
        *,
        batch_size: int = 500,
        linger: float = 0.02,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        on_published: Callable[[int], None] | None = None,
        on_failed: Callable[[int], None] | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if batch_size < 1 or backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need batch_size >= 1 and 0 < backoff_initial <= backoff_max")
        self._outbox = outbox
        self._publisher = publisher
        self._batch_size = batch_size
        # After waking up for new events, wait this long for more: at moderate rates
        # one publish (and one delete) then carries many events instead of one each,
        # which is most of the relay's CPU; 20 ms more until Kafka is nothing to billing.
        self._linger = linger
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._on_published = on_published
        self._on_failed = on_failed
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._progress = asyncio.Event()  # rows deleted, or found nothing to do
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.publish_failed = 0
        self.consecutive_failures = 0

    def start(self) -> None:
        if not self._outbox.is_open:  # else the first read fails and the relay ends
            raise RuntimeError("start the outbox before its relay")
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="outbox-relay")

    def backoff_delay(self, failures: int) -> float:
        """Delay after the `failures`-th consecutive failure (1-based): capped
        exponential, scaled by a random factor in [0.5, 1) so that several workers
        do not hammer a recovering broker in lockstep."""
        base = min(self._backoff_max, self._backoff_initial * 2 ** (failures - 1))
        return base * (0.5 + self._rng.random() / 2)

    async def _loop(self) -> None:
        signal = self._outbox.commit_signal
        while True:
            signal.clear()
            try:
                rows = await self._outbox.fetch_pending(self._batch_size)
            except OutboxClosedError:
                return
            except Exception as exc:
                log.error("outbox read failed: %r", exc)
                await self._fail(0)
                continue
            if not rows:
                self._progress.set()
                await signal.wait()
                if self._linger:
                    await asyncio.sleep(self._linger)
                continue
            try:
                await self._publisher.send_batch(rows)
            except Exception as exc:
                # Event ids only in logs: payloads carry key ids and amounts.
                log.warning(
                    "outbox publish of %d events failed (attempt %d): %r",
                    len(rows),
                    self.consecutive_failures + 1,
                    exc,
                )
                await self._fail(len(rows))
                continue
            self.consecutive_failures = 0
            self.published += len(rows)
            if self._on_published is not None:
                self._on_published(len(rows))
            try:
                await self._outbox.delete(rows)
            except OutboxClosedError:
                return
            except Exception as exc:  # rows stay; they are re-sent (same event_id)
                log.error("outbox delete after publish failed: %r", exc)
                await self._fail(0)
                continue
            self._progress.set()

    async def _fail(self, events: int) -> None:
        self.consecutive_failures += 1
        if events:
            self.publish_failed += events
            if self._on_failed is not None:
                self._on_failed(events)
        await self._sleep(self.backoff_delay(self.consecutive_failures))

    async def close(self, drain_deadline: float) -> None:
        """Stop accepting, commit what is queued, keep publishing for at most
        `drain_deadline` seconds, then stop the relay, the publisher and the file.
        Returns within about `drain_deadline` + 1 s (the publisher gets at least 1 s
        to close). Whatever was not published stays in the file for the next start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, drain_deadline)
        await self._outbox.seal()
        while self._task is not None and not self._task.done() and self._outbox.pending_count():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._progress.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A publisher stuck on a dead broker must not hold shutdown hostage.
        try:
            async with asyncio.timeout(max(1.0, deadline - loop.time())):
                await self._publisher.close()
        except Exception as exc:
            log.warning("outbox publisher close failed: %r", exc)
        await self._outbox.close()
        if self._outbox.pending_count():
            log.warning("outbox closed with %d unpublished events", self._outbox.pending_count())


class SinkPublisher:
    """Appends each payload as one JSON line to a file; the embedded default with no
    Kafka. A batch is acknowledged once written (to the page cache: like the outbox,
    it survives a process crash; an fsync per batch cost more CPU than the request)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    async def send_batch(self, rows: Sequence[OutboxRow]) -> None:
        # JSON only has raw newlines as insignificant whitespace (inside strings they
        # are escaped), so flattening them keeps the payload valid and one per line.
        data = b"".join(r.payload.replace(b"\n", b" ") + b"\n" for r in rows)
        self._append(data)

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(data)

    async def close(self) -> None:
        return None
