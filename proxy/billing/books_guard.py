"""The guard without Redis: asks the books directly (the embedded ledger's balance,
through any `BalanceSource`), under the same budget and fail rule as the Redis
guard. For one box with no Redis; with Redis the projection and the Redis guard are
cheaper (no database read per request).

Reservations here are held in process: admitted iff balance - held >= estimate,
decided without an await between the sum and the write, so concurrent requests of
one process cannot both take the same credit. The embedded ledger calls
`release_applied` with the request ids of each batch it applied, after its commit;
a balance read that overlapped a release is read again, so a debit and the release
of its hold are never both missed or both counted as free credit. Holds are per
process: under `serve --workers N` each worker holds only its own requests, so
the overdraft bound becomes one request's estimate error per worker, plus what the
other workers' in-flight requests will cost (up to N-1 estimates); run one
worker, or Redis, where that matters."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from proxy.billing.guard import GuardDecision
from proxy.billing.hold import Hold, Reservation, Reserved
from proxy.billing.payer import BillingContext
from proxy.config.model import FailPolicy, GuardConfig
from proxy.logs import ThrottledLog

if TYPE_CHECKING:
    from proxy.billing.script_batcher import BusCall

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

    async def reserve(
        self, hold: Hold, estimate: int, floor: int, then: BusCall | None = None
    ) -> Reservation:
        """Hold `estimate` credits for `hold` (clamp mode: at least `floor`). `then`:
        a script call to run along when the estimate is held, where the guard can
        (its reply in `Reservation.then_reply`; None: the caller makes it)."""
        ...

    def settle(self, hold: Hold, credits: int) -> None:
        """The request ended: its hold becomes `credits` (0: released) until the
        ledger applies the charge."""
        ...

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
        self._config = config
        self._budget_s = config.budget_ms / 1000.0
        self._fail_open_log = ThrottledLog(log, config.fail_open_log_interval_s, clock)
        self._clock = clock
        self._ttl = config.hold_ttl_s
        # user -> request id -> (credits, expires at, monotonic clock)
        self._holds: dict[int, dict[str, tuple[int, float]]] = {}
        self._releases = 0  # bumped by every release_applied
        self.on_reservation: Callable[[str, int], None] = _ignore
        self.on_held: Callable[[int], None] = _ignore

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

    async def reserve(
        self, hold: Hold, estimate: int, floor: int, then: BusCall | None = None
    ) -> Reservation:
        # `then` is never run here (no Redis script call to join): the caller makes it.
        try:
            async with asyncio.timeout(self._budget_s):
                view = await self._read_settled(hold.user_id)
        except Exception as exc:
            closed = self._config.fail is FailPolicy.CLOSED
            self._fail_open_log.warning(
                f"guard: balance unavailable ({type(exc).__name__}), failing "
                f"{'closed' if closed else 'open'}"
            )
            return Reservation(Reserved.UNAVAILABLE if closed else Reserved.FAIL_OPEN)
        # No await from here on: the sum and the write are one step of the loop.
        now = self._clock()
        holds = self._holds.get(hold.user_id) or {}
        expired = [rid for rid, (_, until) in holds.items() if until <= now]
        for rid in expired:
            del holds[rid]
        if expired:
            self.on_reservation("expired", len(expired))
        held = sum(c for c, _ in holds.values())
        available = view.balance
        if hold.request_id in holds:
            return Reservation(Reserved.CONFLICT, 0, available, held)
        room = available - held
        if not view.is_blocked and room >= estimate:
            result, take = Reserved.ADMITTED, estimate
        elif not view.is_blocked and 0 < floor <= room:
            result, take = Reserved.CLAMPED, room
        else:
            self.on_reservation(Reserved.REFUSED.value, 1)
            return Reservation(Reserved.REFUSED, 0, available, held)
        if take > 0:
            holds[hold.request_id] = (take, now + self._ttl)
            self._holds[hold.user_id] = holds
            hold.credits = take
            self.on_held(take)
        self.on_reservation(result.value, 1)
        return Reservation(result, take, available, held)

    async def _read_settled(self, user_id: int) -> BalanceView:
        """The balance, read again if a release landed while it was read (the
        debit it releases may or may not be in what was read)."""
        for _ in range(3):
            before = self._releases
            view = await self._source.fetch(user_id)
            if self._releases == before:
                break
        return view

    def settle(self, hold: Hold, credits: int) -> None:
        if hold.settled:
            return
        hold.settled = True
        if hold.credits:
            self.on_held(-hold.credits)
        holds = self._holds.get(hold.user_id)
        if holds is None or hold.request_id not in holds:
            return  # released by the ledger already, or never written
        if credits <= 0:
            del holds[hold.request_id]
            if not holds:
                del self._holds[hold.user_id]
        else:
            holds[hold.request_id] = (credits, self._clock() + self._ttl)

    def release_applied(self, applied: Mapping[int, Iterable[str]]) -> None:
        """The ledger applied (committed) these users' charges: their holds go."""
        self._releases += 1
        for user_id, request_ids in applied.items():
            holds = self._holds.get(user_id)
            if holds is None:
                continue
            for rid in request_ids:
                holds.pop(rid, None)
            if not holds:
                del self._holds[user_id]

    def held(self, user_id: int) -> int:
        """Credit held for `user_id` in this process (live holds only)."""
        now = self._clock()
        return sum(c for c, until in self._holds.get(user_id, {}).values() if until > now)

    async def close(self) -> None:
        return None


def _ignore(*_: object) -> None:
    return None
