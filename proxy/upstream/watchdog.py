"""The per-request watchdog: first-byte, idle and total bounds with one timer."""

from __future__ import annotations

import asyncio

from proxy.config.model import Timeouts


class Watchdog:
    """Bounds the wait for the first byte, the gap between chunks and the whole exchange.

    One timer per request that re-arms itself lazily: a chunk only stores the
    time it arrived (no timer churn per chunk); when the timer fires it checks
    that stamp and either re-arms or cancels the reading task, which the caller
    turns into a timeout (`expired` tells a timeout from a client disconnect).
    The total bound lives here too rather than in aiohttp's ClientTimeout, which
    would arm a second timer per request (~8 us CPU, measured).
    """

    __slots__ = (
        "_end",
        "_handle",
        "_limit",
        "_loop",
        "_streaming",
        "_task",
        "expired",
        "idle",
        "last",
        "started",
    )

    def __init__(self, timeouts: Timeouts) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.idle = timeouts.idle
        self._limit = timeouts.first_byte
        self._streaming = False  # the first byte arrived: `_limit` is now `idle`
        self.started = self.last = self._loop.time()
        self._end = self.started + timeouts.total
        self.expired: str | None = None
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(
            min(self.last + self._limit, self._end), self._check
        )

    def first_byte(self) -> None:
        self.last = self._loop.time()
        if self._handle is not None and self.idle < self._limit:
            # The armed timer still points at the first-byte deadline; a stall right
            # after the first chunk must be caught after `idle`, not after that.
            self._handle.cancel()
            self._handle = self._loop.call_at(min(self.last + self.idle, self._end), self._check)
        self._limit = self.idle
        self._streaming = True

    def touch(self) -> None:
        self.last = self._loop.time()

    def _check(self) -> None:
        deadline = min(self.last + self._limit, self._end)
        now = self._loop.time()
        if now >= deadline:
            self._handle = None
            if now >= self._end:
                self.expired = "total"
            else:
                self.expired = "idle" if self._streaming else "first byte"
            if self._task is not None:
                self._task.cancel()
        else:
            self._handle = self._loop.call_at(deadline, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def absorb(self) -> bool:
        """After a CancelledError: True if it was our timeout (and swallow it)."""
        if self.expired is not None and self._task is not None:
            self._task.uncancel()
            return True
        return False
