"""The publisher: hands committed outbox rows to a sink in commit order and deletes
them only after the sink acknowledged; the JSON-lines sink for running without Kafka.

A sink is anything with `send_batch(rows)` (return only once every row is
acknowledged) and `close()`: `JsonLinesSink` here, `KafkaSink` in proxy.delivery.kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from proxy.delivery.outbox import Outbox, OutboxClosedError, OutboxRow

log = logging.getLogger(__name__)


class Sink(Protocol):
    async def send_batch(self, rows: Sequence[OutboxRow]) -> None:
        """Return only once every row is acknowledged; raise if any was not."""

    async def close(self) -> None: ...


class OutboxPublisher:
    """Publishes committed rows in seq order to a sink; deletes them only after the ack.

    While the sink fails the batch is retried with capped exponential backoff
    plus jitter; nothing is dropped. Counters are plain ints (`published`,
    `publish_failed`, in events) and the optional callbacks receive the same deltas.
    """

    def __init__(
        self,
        outbox: Outbox,
        sink: Sink,
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
        self._sink = sink
        self._batch_size = batch_size
        # After waking up for new events, wait this long for more: at moderate rates
        # one publish (and one delete) then carries many events instead of one each,
        # which is most of the publisher's CPU; 20 ms more until Kafka is nothing to billing.
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
        if not self._outbox.is_open:  # else the first read fails and the loop ends
            raise RuntimeError("start the outbox before its publisher")
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="outbox-publisher")

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
                await self._sink.send_batch(rows)
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
        `drain_deadline` seconds, then stop the loop, the sink and the file.
        Returns within about `drain_deadline` + 1 s (the sink gets at least 1 s
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
        # A sink stuck on a dead broker must not hold shutdown hostage.
        try:
            async with asyncio.timeout(max(1.0, deadline - loop.time())):
                await self._sink.close()
        except Exception as exc:
            log.warning("outbox sink close failed: %r", exc)
        await self._outbox.close()
        if self._outbox.pending_count():
            log.warning("outbox closed with %d unpublished events", self._outbox.pending_count())


class JsonLinesSink:
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
