"""Durable outbox: charge events are committed to SQLite before anyone is told "done";
the publisher (proxy.delivery.publisher) hands them to a sink (Kafka or a JSON-lines
file) and deletes them only after the sink acknowledged. No charge is ever lost; a
crash between publish and delete re-sends the row with the same `event_id`
(consumers are idempotent on it).

Read path: while every row in the file is one this process committed (no leftovers
from an earlier run), the committed rows are also kept in memory, in seq order, and
the publisher takes them from there: no SELECT of payloads just written, and each
published batch, consecutive seqs, is deleted by one range statement (bench: the
outbox's share of a request's CPU was ~1/8 of the full pipeline's, mostly these).

Write path (`put_nowait`): the handler appends to an in-memory buffer and awaits a future.
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
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import NamedTuple

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
# Explicit seqs (the next one known: the rows kept in memory carry theirs); only a
# repeated event_id is ignored, a seq taken (another writer on the file) is an error.
_INSERT = (
    "INSERT INTO outbox (seq, event_id, key, payload, created_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (event_id) DO NOTHING"
)


# Events kept in memory while commits fail (disk full): beyond this, the oldest go.
_MAX_UNCOMMITTED = 100_000
# Committed rows kept in memory for the publisher; beyond this (a sink down for long)
# it reads them from the file again.
_MAX_RECENT = 20_000
# A WAL past this after the periodic checkpoint is checkpointed to its end and restarted.
_WAL_RESTART_BYTES = 16 << 20
_COMMIT_RETRY_MAX_S = 5.0


class OutboxClosedError(RuntimeError):
    """The outbox no longer accepts events (it is closing or closed)."""


class OutboxRow(NamedTuple):
    """A committed event. A tuple, not a frozen dataclass: one is made per event on
    the loop (a frozen dataclass's __init__ cost ~1 us, 5x a tuple's)."""

    seq: int
    event_id: str
    key: bytes
    payload: bytes
    created_at: float


class Outbox:
    """Embedded durable store (SQLite, WAL). Create, `await start()`, then `put_nowait()`."""

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
        self._committed = asyncio.Event()  # rows became visible to the publisher
        self._checkpointer: asyncio.Task[None] | None = None
        self._dirty = False  # commits since the last checkpoint
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None  # start()'s
        self._pending = 0
        self._commit_failures = 0
        self._oldest: float | None = None
        self._next_seq = 1
        # Every row of the file, in seq order, while the file holds only rows this
        # process committed; None: read them from the file.
        self._recent: deque[OutboxRow] | None = None
        # Another writer took one of our seqs: its rows are in the file too, so the
        # file stays the publisher's reference for good (our counts are not its).
        self._shared = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or create) the file, count leftovers, start checkpointing."""
        self._pending, self._oldest = self._db_open()
        # Asked once: on Python 3.11 each `get_running_loop` is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="outbox-ckpt")
        if self._pending:
            self._committed.set()  # leftovers from a previous run: wake the publisher

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
        loop = self._loop
        assert loop is not None  # accepting: started
        fut: asyncio.Future[None] = loop.create_future()
        self._buffer.append((event_id, key, payload, self._clock(), fut))
        if self._flush_handle is None:
            self._flush_handle = (
                loop.call_later(self._flush_interval, self._flush)
                if self._flush_interval
                else loop.call_soon(self._flush)
            )
        return fut

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
                    self._restart_wal()
                except sqlite3.Error as exc:
                    log.warning("outbox checkpoint failed: %r", exc)

    def _restart_wal(self) -> None:
        """Under steady writes the checkpoint beside them never catches up (frames keep
        coming while it copies), so SQLite never restarts the WAL: it grew by ~15 MB/s
        at saturation, and every commit got slower (bench: -10 % req/s in 25 s). Past
        `_WAL_RESTART_BYTES` the rest is checkpointed here, on the loop, the only
        writer (the few frames written since the thread's checkpoint) and the next
        commit writes the WAL from its start again: the file stays at about that size.
        A stall of the loop of ~2 ms (TRUNCATE, which also shrinks the file, took ~10),
        at most every few seconds, and only under steady load."""
        conn = self._conn
        if conn is None:
            return
        try:
            size = os.stat(f"{self.path}-wal").st_size
        except OSError:
            return
        if size > _WAL_RESTART_BYTES:
            conn.execute("PRAGMA wal_checkpoint(RESTART)")

    def _checkpoint(self) -> None:
        """fsync the WAL and copy it into the database file (a thread of its own,
        with its own connection: the loop's writes go on meanwhile)."""
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    # -- read side (publisher) ----------------------------------------------------------

    @property
    def commit_signal(self) -> asyncio.Event:
        """Set after every commit that added rows. The (single) publisher clears it before
        reading, so a commit landing while it publishes is never slept through."""
        return self._committed

    async def fetch_pending(self, limit: int) -> list[OutboxRow]:
        """The oldest `limit` rows, in commit (seq) order."""
        recent = self._recent
        if recent is not None and self._conn is not None:
            return list(islice(recent, limit))
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
        count, top = conn.execute("SELECT COUNT(*), MAX(seq) FROM outbox").fetchone()
        self._next_seq = (top or 0) + 1
        self._recent = None if count else deque()
        return int(count), self._db_head()

    def _db_head(self) -> float | None:
        assert self._conn is not None
        row = self._conn.execute(_HEAD).fetchone()
        return None if row is None else float(row[0])

    def _db_insert(self, rows: list[tuple[str, bytes, bytes, float]]) -> tuple[int, float | None]:
        conn = self._conn
        assert conn is not None
        first = self._next_seq
        numbered = [(first + i, *row) for i, row in enumerate(rows)]
        try:
            inserted = self._db_write(numbered)
        except sqlite3.IntegrityError:
            # A seq already taken: someone else writes to this file. Number after
            # its rows, and read from the file from now on (its rows are not ours).
            self._recent = None
            self._shared = True
            (top,) = conn.execute("SELECT MAX(seq) FROM outbox").fetchone()
            first = (top or 0) + 1
            numbered = [(first + i, *row) for i, row in enumerate(rows)]
            inserted = self._db_write(numbered)
        self._next_seq = first + len(rows)
        recent = self._recent
        if recent is not None:
            if inserted == len(rows) and len(recent) + inserted <= _MAX_RECENT:
                recent.extend(map(OutboxRow._make, numbered))
            else:  # a repeated event_id (which row is not known) or too many kept
                self._recent = recent = None
        # Inserts append: the oldest pending row only changes when there was none.
        if self._oldest is not None or not inserted:
            return inserted, self._oldest
        if recent:
            return inserted, recent[0].created_at
        return inserted, self._db_head()

    def _db_write(self, numbered: list[tuple[int, str, bytes, bytes, float]]) -> int:
        conn = self._conn
        assert conn is not None
        before = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, numbered)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return conn.total_changes - before

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
        numbers = [s for (s,) in seqs]
        low, high = min(numbers), max(numbers)
        # Consecutive seqs, each once (a published batch): one range statement.
        ranged = high - low + 1 == len(numbers) == len(set(numbers))
        before = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            if ranged:
                conn.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (low, high))
            else:
                conn.executemany("DELETE FROM outbox WHERE seq = ?", seqs)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        deleted = conn.total_changes - before
        recent = self._recent
        if recent is not None:
            if ranged and recent and recent[0].seq == low and len(recent) >= len(numbers):
                for _ in range(len(numbers)):
                    recent.popleft()
            else:  # not the head of the rows kept: the file is the reference again
                self._recent = recent = None
        if recent is None and self._pending == deleted and not self._shared:
            # The file is empty now: what is committed from here on is all it holds.
            self._recent = recent = deque()
        if recent is not None:
            return deleted, recent[0].created_at if recent else None
        return deleted, self._db_head()
