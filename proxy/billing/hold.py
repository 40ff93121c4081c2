"""The values of a reservation: what admission holds for one request, and what the
guard answered. No I/O here (proxy.billing.reservations: Redis; books_guard: the
embedded ledger's books; proxy.billing.admission: the request path's two calls)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proxy.contract.records import record


class Reserved(StrEnum):
    """A reservation's result (`llm_proxy_reservations_total{result}` counts the first
    three, plus `expired`: holds purged unsettled-or-unapplied at their expiry)."""

    ADMITTED = "admitted"  # the estimate is held
    CLAMPED = "clamped"  # the rest of the credit is held, the output limit lowered
    REFUSED = "refused"  # available - held < estimate (or the user is blocked)
    CONFLICT = "conflict"  # this user already holds credit under this request id
    FAIL_OPEN = "fail_open"  # could not decide (Redis, the books): served unheld
    UNAVAILABLE = "unavailable"  # could not decide and guard.fail is closed


@record
class Reservation:
    result: Reserved
    held: int = 0  # credits now held under the request id
    available: int | None = None  # the user's balance as the guard saw it
    holding: int = 0  # credit held by the user's other requests at that moment
    # The reply of the call chained to the reservation (`reserve(then=)`), when it
    # ran (an error reply: its exception); None when it did not.
    then_reply: Any = None


@dataclass(slots=True)
class Hold:
    """One request's hold, from before the reserve call (a cancelled call may still
    have written it) until settlement hands it to the ledger."""

    user_id: int
    request_id: str
    credits: int = 0  # as far as this process knows (the held-credit gauge)
    settled: bool = False
