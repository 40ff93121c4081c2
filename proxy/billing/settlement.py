"""Settlement: the one place that turns a finished request's usage into a charge.

`settle()` runs exactly once per request when it ends, however it ends; the
handler hands the event to the durable outbox before anything can cancel it.
"""

from __future__ import annotations

from proxy.billing.payer import BillingContext
from proxy.billing.pricing import Charge, price
from proxy.billing.record import ChatRequest, Exchange
from proxy.contract.charge_event import ChargeEvent
from proxy.contract.outcome import Outcome
from proxy.contract.records import record
from proxy.contract.usage import Usage


@record
class Settlement:
    """`event`: the charge to record (None: nothing to charge); `charge`: its price
    (None when there is no event)."""

    charge: Charge | None
    event: ChargeEvent | None


def settle(ex: Exchange, now: float) -> Settlement:
    """Price the usage and build the charge event, if this request is chargeable.

    Charged: a known payer (user_id > 0), not skip_charge, and tokens > 0 —
    including aborted or failed calls that consumed tokens.
    """
    metered, chat, ctx = ex.metered, ex.chat, ex.ctx
    if metered is None or chat is None or ctx is None:
        return Settlement(None, None)
    usage = metered.usage
    alias = chat.alias
    if not _chargeable(ctx, usage):
        # Nobody to charge (no payer, skip_charge, no token): no event, so no price
        # either (pricing it cost ~23k interpreter instructions a request for nothing).
        return Settlement(None, None)
    charge = _price(chat, usage, ex.started_ms)
    # Positional, in `create`'s order (tests/billing/test_settlement.py checks each
    # field): its 21 keywords cost ~10 % of settling.
    event = ChargeEvent.create(
        ctx.request_id,
        ctx.user_id,
        ctx.scene,
        ctx.conversation_id,
        alias.name,  # alias
        alias.provider.name,  # provider
        alias.model,  # upstream_model
        chat.stream,
        usage,
        metered.source,  # usage_source
        charge.rule_id,  # price_rule
        charge.credits,
        ex.outcome or Outcome.COMPLETED,
        ex.latency_ms(now),
        ex.ttft_ms(),
        ex.started_ms,
        chat.service_tier,
        charge.rule_version,  # price_version
        ex.client_disconnected,
        chat.endpoint,
        ex.attempts,
    )
    return Settlement(charge, event)


def quote(ex: Exchange, usage: Usage) -> int:
    """The credits `settle` will charge this request for `usage` (0: no charge event):
    what the caller is told in band (`usage.cost`, `X-Credits-Charged`)."""
    if ex.chat is None or ex.ctx is None or not _chargeable(ex.ctx, usage):
        return 0
    return _price(ex.chat, usage, ex.started_ms).credits


def _price(chat: ChatRequest, usage: Usage, started_ms: int) -> Charge:
    return price(
        chat.alias.price_rule, usage, service_tier=chat.service_tier, started_ms=started_ms
    )


def _chargeable(ctx: BillingContext, usage: Usage) -> bool:
    return ctx.user_id > 0 and not ctx.skip_charge and usage.total_tokens > 0
