"""Per-target cooldown (a small circuit breaker) and per-target concurrency slots.

A target that failed `allowed_fails` times within `window_s` is skipped for
`cooldown_s`; then one probe goes through: its success closes the breaker, its
failure opens it again. State is per process (each replica learns on its own).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from proxy.config.model import RoutingPolicy


class Breaker:
    __slots__ = ("_fails", "_on_change", "open_until", "probe_started")

    def __init__(self, on_change: Callable[[bool], None]) -> None:
        self._fails: deque[float] = deque()
        self.open_until = 0.0  # monotonic; 0: closed
        self.probe_started = 0.0  # a probe is in flight since (0: none)
        self._on_change = on_change

    @property
    def cooling(self) -> bool:
        """Open or probing: what the cooldown gauge shows."""
        return self.open_until > 0

    def available(self, now: float, policy: RoutingPolicy) -> bool:
        """Whether a request may use the target now (the probe slot counts as taken
        until its probe ends; a probe that never reported is forgotten after a cooldown)."""
        if self.open_until == 0:
            return True
        if now < self.open_until:
            return False
        return self.probe_started == 0 or now - self.probe_started > policy.cooldown_s

    def begin(self, now: float) -> None:
        if self.open_until and now >= self.open_until:
            self.probe_started = now

    def success(self) -> None:
        self._fails.clear()
        self.probe_started = 0.0
        if self.open_until:
            self.open_until = 0.0
            self._on_change(False)

    def failure(self, now: float, policy: RoutingPolicy) -> None:
        if self.open_until:  # the probe (or a request let through while cooling) failed
            self.open_until = now + policy.cooldown_s
            self.probe_started = 0.0
            return
        fails = self._fails
        fails.append(now)
        while fails and fails[0] < now - policy.window_s:
            fails.popleft()
        if policy.allowed_fails and len(fails) >= policy.allowed_fails and policy.cooldown_s:
            fails.clear()
            self.open_until = now + policy.cooldown_s
            self._on_change(True)

    def state(self, now: float) -> str:
        if not self.open_until:
            return "ok"
        if now < self.open_until:
            return "cooldown"
        return "probing" if self.probe_started else "probe_due"


class Slots:
    """At most `limit` exchanges with one target at once; a bounded wait for a slot."""

    __slots__ = ("_sem", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sem = asyncio.Semaphore(limit)

    @property
    def in_use(self) -> int:
        return self.limit - self._sem._value

    async def acquire(self, wait_s: float) -> Callable[[], None] | None:
        """A release function, or None when no slot freed within `wait_s`."""
        sem = self._sem
        if not sem.locked():
            await sem.acquire()  # returns at once
        elif wait_s <= 0:
            return None
        else:
            try:
                async with asyncio.timeout(wait_s):
                    await sem.acquire()
            except TimeoutError:
                return None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                sem.release()

        return release


def monotonic() -> float:
    return time.monotonic()
