"""Settlement: the one place that turns a finished request's usage into a charge.

`settle()` runs exactly once per request when it ends, however it ends; the
handler hands the event to the durable outbox before anything can cancel it.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.billing.pricing import Charge, price
from proxy.billing.record import Exchange
from proxy.contract.charge_event import ChargeEvent
from proxy.contract.usage import Outcome


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
        price_rule=charge.rule_id,
        credits=charge.credits,
        outcome=ex.outcome or Outcome.COMPLETED,
        latency_ms=ex.latency_ms(now),
        ttft_ms=ex.ttft_ms(),
        client_disconnected=ex.client_disconnected,
    )
    return Settlement(charge, event)
