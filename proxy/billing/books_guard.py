"""The guard without Redis: asks the books directly (the embedded ledger's balance,
through any `BalanceSource`), under the same budget and fail-open rule as
CreditBalanceGuard. For one box with no Redis; with Redis the projection and
CreditBalanceGuard are cheaper (no database read per request)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from proxy.billing.guard import GuardDecision
from proxy.billing.payer import BillingContext
from proxy.config.model import GuardConfig
from proxy.logs import ThrottledLog

log = logging.getLogger(__name__)


class BalanceView(Protocol):
    @property
    def balance(self) -> int: ...

    @property
    def is_blocked(self) -> bool: ...


class BalanceSource(Protocol):
    async def fetch(self, user_id: int) -> BalanceView: ...


class Guard(Protocol):
    """What the request path needs of a guard."""

    async def check(self, ctx: BillingContext) -> GuardDecision: ...

    async def close(self) -> None: ...


class BooksGuard:
    def __init__(
        self,
        source: BalanceSource,
        config: GuardConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._budget_s = config.budget_ms / 1000.0
        self._fail_open_log = ThrottledLog(log, config.fail_open_log_interval_s, clock)

    async def check(self, ctx: BillingContext) -> GuardDecision:
        if ctx.user_id <= 0 or ctx.skip_charge:
            return GuardDecision.SKIPPED
        try:
            async with asyncio.timeout(self._budget_s):
                view = await self._source.fetch(ctx.user_id)
        # Whatever the source fails with (a database error, a timeout): serve and
        # charge afterwards, as the Redis guard does when it cannot know in time.
        except Exception as exc:
            self._fail_open_log.warning(f"guard: balance unavailable ({type(exc).__name__})")
            return GuardDecision.FAIL_OPEN
        if view.is_blocked or view.balance <= 0:
            return GuardDecision.BLOCK
        return GuardDecision.ALLOW

    async def close(self) -> None:
        return None
