"""The per-request watchdog: first-byte, idle and total bounds, checked by one shared
timer per event loop."""

from __future__ import annotations

import asyncio
from typing import Final

from proxy.config.model import Timeouts

# How late a bound may be noticed so that a request need not move the shared timer:
# a deadline this close after the armed one waits for it. Bounds are seconds long
# (config); sub-second ones (tests) still fire, at most this much later.
SLACK_S: Final = 0.05


class WatchdogTicker:
    """The live watchdogs of one event loop and the one timer that checks them (the
    router owns one per app; a watchdog made without one gets its own).

    The timer is armed for the earliest deadline it knows of; a new watchdog whose
    deadline is later (the usual case: requests start one after another with the
    same bounds) only joins the set, so a request costs a set add and a discard
    instead of a `call_at` + cancel. When the timer fires it checks every live
    watchdog (a chunk only stored the time it arrived), expires those whose bound
    passed and re-arms for the next deadline.
    """

    __slots__ = ("_armed", "_dogs", "_loop", "_when")

    def __init__(self) -> None:
        self._dogs: set[Watchdog] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the first watchdog's
        # The timer's handle is not kept (it would keep the loop alive from here):
        # `_armed` counts arms, and a timer superseded by an earlier one finds its
        # number stale when it fires and does nothing.
        self._armed = 0
        self._when: float | None = None  # when the current timer fires; None: none

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the ticker serves, asked once (each `asyncio.get_running_loop`
        is a getpid() system call on Python 3.11); asked again once it is closed."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def add(self, dog: Watchdog, deadline: float) -> None:
        self._dogs.add(dog)
        self.ensure(dog._loop, deadline)

    def ensure(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Have the timer fire by `deadline` (+ SLACK_S)."""
        when = self._when
        if when is not None and deadline >= when - SLACK_S:
            return
        self._arm(loop, deadline)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._armed += 1
        self._when = when
        loop.call_at(when, self._fire, self._armed)

    def discard(self, dog: Watchdog) -> None:
        self._dogs.discard(dog)  # the timer stays: it finds nothing to do, or others

    def _fire(self, armed: int) -> None:
        if armed != self._armed:
            return  # superseded by an earlier timer
        self._when = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired: list[Watchdog] = []
        next_deadline: float | None = None
        for dog in self._dogs:
            deadline = dog._deadline()
            if now >= deadline:
                expired.append(dog)
            elif next_deadline is None or deadline < next_deadline:
                next_deadline = deadline
        for dog in expired:
            self._dogs.discard(dog)
            dog._expire()
        if next_deadline is not None:
            # Not sooner than SLACK_S from now: many streams' deadlines close together
            # are checked in one pass, not one timer each.
            self._arm(loop, max(next_deadline, now + SLACK_S))


class Watchdog:
    """Bounds the wait for the first byte, the gap between chunks and the whole exchange.

    A chunk only stores the time it arrived (no timer churn per chunk); the loop's
    shared timer (`WatchdogTicker`) checks that stamp and, once a bound has passed, cancels
    the reading task, which the caller turns into a timeout (`expired` tells a
    timeout from a client disconnect). The total bound lives here too rather than in
    aiohttp's ClientTimeout, which would arm a timer per request (~8 us CPU,
    measured). A bound is noticed at most SLACK_S late.
    """

    __slots__ = (
        "_end",
        "_limit",
        "_live",
        "_loop",
        "_streaming",
        "_task",
        "_ticker",
        "clock",
        "expired",
        "idle",
        "last",
        "started",
    )

    def __init__(self, timeouts: Timeouts, ticker: WatchdogTicker | None = None) -> None:
        ticker = self._ticker = ticker or WatchdogTicker()
        loop = self._loop = ticker.running_loop()
        self._task = asyncio.current_task(loop)
        self.idle = timeouts.idle
        self._limit = timeouts.first_byte
        self._streaming = False  # the first byte arrived: `_limit` is now `idle`
        # The loop's clock, bound once: the relay stamps `last` with it for every
        # chunk (`wd.last = clock()`), which spares a method call a chunk.
        self.clock = loop.time
        self.started = self.last = self.clock()
        self._end = self.started + timeouts.total
        self.expired: str | None = None
        self._live = True
        ticker.add(self, self._deadline())

    def first_byte(self) -> None:
        self.last = self._loop.time()
        if self._live and self.idle < self._limit:
            # The timer may still point at the first-byte deadline; a stall right
            # after the first chunk must be caught after `idle`, not after that.
            self._ticker.ensure(self._loop, min(self.last + self.idle, self._end))
        self._limit = self.idle
        self._streaming = True

    def touch(self) -> None:
        self.last = self._loop.time()

    def _deadline(self) -> float:
        deadline = self.last + self._limit
        return deadline if deadline < self._end else self._end

    def _expire(self) -> None:
        """Called by the ticker once a bound passed: name it, cancel the task."""
        self._live = False
        # The bound whose deadline came first (total on a tie), however late the
        # check ran.
        if self._end <= self.last + self._limit:
            self.expired = "total"
        else:
            self.expired = "idle" if self._streaming else "first byte"
        if self._task is not None:
            self._task.cancel()

    def cancel(self) -> None:
        if self._live:
            self._live = False
            self._ticker.discard(self)

    def absorb(self) -> bool:
        """After a CancelledError: True if it was our timeout (and swallow it)."""
        if self.expired is not None and self._task is not None:
            self._task.uncancel()
            return True
        return False
