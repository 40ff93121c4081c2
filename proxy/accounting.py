"""The record of one request and its settlement: price, charge event, outbox.

`Exchange` is filled in along the request path; `settle()` runs exactly once per
request when it ends, however it ends, and is the only place that turns usage
into a charge event. Enqueueing into the durable outbox is shielded from the
client's disconnect so a charge is never lost with the request task.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import tiktoken

from proxy.billing import BillingContext
from proxy.chat_request import ChatRequest
from proxy.errors import ApiError
from proxy.events import ChargeEvent
from proxy.metering import Metered, estimate_prompt_only
from proxy.pricing import Charge, price
from proxy.usage import Outcome

if TYPE_CHECKING:
    from proxy.upstream import Watchdog

log = logging.getLogger("proxy.accounting")


class Exchange:
    """Mutable, per-request facts (one object per request, never shared)."""

    __slots__ = (
        "chat",
        "ctx",
        "encoding",
        "error_kind",
        "first_byte_at",
        "guard_decision",
        "metered",
        "outcome",
        "started",
        "status",
        "upstream_started",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.upstream_started: float | None = None
        self.first_byte_at: float | None = None
        self.chat: ChatRequest | None = None
        self.ctx: BillingContext | None = None
        self.encoding: tiktoken.Encoding | None = None
        self.guard_decision: str | None = None
        self.outcome: Outcome | None = None
        self.status: int = 0
        self.error_kind: str | None = None
        self.metered: Metered | None = None

    @property
    def request_id(self) -> str:
        return self.ctx.request_id if self.ctx is not None else ""

    def mark_first_byte(self) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()

    def finish(self, outcome: Outcome, status: int, *, error_kind: str | None = None) -> None:
        self.outcome = outcome
        self.status = status
        if error_kind is not None:
            self.error_kind = error_kind

    def estimate_prompt_only(self) -> Metered:
        return estimate_prompt_only(self.chat.body, self.encoding)

    def timeout_error(self, wd: Watchdog) -> ApiError:
        return ApiError(
            504,
            f"upstream timed out ({wd.expired})",
            type="upstream_error",
            code="upstream_timeout",
        )

    def latency_ms(self, now: float) -> float:
        return round((now - self.started) * 1000, 3)

    def ttft_ms(self) -> float | None:
        if self.first_byte_at is None:
            return None
        return round((self.first_byte_at - self.started) * 1000, 3)


@dataclass(frozen=True, slots=True)
class Settlement:
    charge: Charge | None
    event: ChargeEvent | None


def settle(ex: Exchange, now: float) -> Settlement:
    """Price the usage and build the charge event, if this request is chargeable.

    Charged: a known payer (user_id > 0), not skip_charge, and tokens > 0 —
    including aborted or failed calls that consumed tokens.
    """
    if ex.metered is None or ex.chat is None or ex.ctx is None:
        return Settlement(None, None)
    usage = ex.metered.usage
    alias = ex.chat.alias
    charge = price(alias.price_rule, usage)
    ctx = ex.ctx
    if ctx.user_id <= 0 or ctx.skip_charge or usage.total_tokens <= 0:
        return Settlement(charge, None)
    event = ChargeEvent.create(
        request_id=ctx.request_id,
        user_id=ctx.user_id,
        scene=ctx.scene,
        conversation_id=ctx.conversation_id,
        alias=alias.name,
        provider=alias.provider.name,
        upstream_model=alias.model,
        stream=ex.chat.stream,
        usage=usage,
        usage_source=ex.metered.source,
        charge=charge,
        outcome=ex.outcome or Outcome.COMPLETED,
        latency_ms=ex.latency_ms(now),
        ttft_ms=ex.ttft_ms(),
    )
    return Settlement(charge, event)
