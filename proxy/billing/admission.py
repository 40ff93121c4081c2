"""Admission and settlement of a request's credit: the two calls the request path
makes (README "Credit guard").

`admit` runs before the upstream is called. In `guard.mode: reserve` it estimates
the request (proxy.billing.estimate) and holds that much of the payer's credit;
refused, it raises 402 `credit_balance_insufficient` saying what is available and
what the request may cost. An alias with `on_insufficient: clamp` is served with a
lower output limit instead when the credit left affords at least
`clamp_min_tokens`. In `guard.mode: check` it is the original pre-check.

With rate limits on, the limiter's admission is chained to the reservation: one
script call runs both (the limiter's only when the estimate is held: refused or
clamped, it is made afterwards, as without a reservation), its decision left on the
exchange for the limits step (proxy.server.limits_step).

`settle_hold` runs when the request ends, however it ends: the hold becomes the
charge (0 releases it at once) and stays held until the ledger applies the charge
and deletes it in the same step that rewrites the balance.
"""

from __future__ import annotations

from proxy.billing.books_guard import Guard
from proxy.billing.estimate import clamped_output, estimate_request, with_output_limit
from proxy.billing.guard import GuardDecision
from proxy.billing.hold import Hold, Reserved
from proxy.billing.limits import RateLimiter
from proxy.billing.pricing import upper_bound
from proxy.billing.record import ChatRequest, Exchange
from proxy.billing.settlement import Settlement
from proxy.config.model import GuardMode, OnInsufficient
from proxy.errors import guard_unavailable, insufficient_credit, request_id_in_use

_DECISIONS = {
    Reserved.ADMITTED: GuardDecision.ALLOW,
    Reserved.CLAMPED: GuardDecision.ALLOW,
    Reserved.REFUSED: GuardDecision.BLOCK,
    Reserved.CONFLICT: GuardDecision.BLOCK,
    Reserved.FAIL_OPEN: GuardDecision.FAIL_OPEN,
    Reserved.UNAVAILABLE: GuardDecision.BLOCK,
}


async def admit(
    guard: Guard | None, mode: GuardMode, ex: Exchange, limiter: RateLimiter | None = None
) -> ChatRequest:
    """Decide whether `ex` may call upstream; returns the request to send (its
    output limit lowered in clamp mode). Raises the refusal's ApiError. With a
    `limiter`, its admission may be made along (`ex.rate_admission`)."""
    chat, ctx = ex.chat, ex.ctx
    assert chat is not None and ctx is not None
    if guard is None or ctx.user_id <= 0 or ctx.skip_charge:
        ex.guard_decision = GuardDecision.SKIPPED
        return chat
    if mode is GuardMode.CHECK:
        ex.guard_decision = decision = await guard.check(ctx)
        if decision is GuardDecision.BLOCK:
            raise insufficient_credit()
        return chat
    estimate = estimate_request(chat, started_ms=ex.started_ms)
    ex.prompt_bound = estimate.prompt_tokens
    alias = chat.alias
    floor = 0
    if alias.on_insufficient is OnInsufficient.CLAMP and estimate.output_tokens > 0:
        floor = max(
            1,
            upper_bound(
                alias.price_rule,
                estimate.prompt_tokens,
                min(alias.clamp_min_tokens, estimate.output_tokens),
                service_tier=chat.service_tier,
                started_ms=ex.started_ms,
            ),
        )
    # On the exchange before the call: a cancelled call may still have written it,
    # and the request's end must release it then.
    ex.hold = hold = Hold(ctx.user_id, ctx.request_id)
    if limiter is None:
        r = await guard.reserve(hold, estimate.credits, floor)
    else:
        # = admission_tokens(chat, prompt): the estimate's prompt bound and output
        # allowance, already computed
        tokens = estimate.prompt_tokens + estimate.output_tokens
        then = limiter.admit_call(ctx, tokens, ctx.request_id)
        r = await guard.reserve(hold, estimate.credits, floor, then)
        if r.then_reply is not None:
            ex.rate_admission = limiter.decide(then, tokens, r.then_reply)
    ex.guard_decision = _DECISIONS[r.result]
    if r.result in (Reserved.REFUSED, Reserved.CONFLICT):
        # Nothing was written; under CONFLICT the id's hold is another request's,
        # which this one's end must not release.
        ex.hold = None
    if r.result is Reserved.REFUSED:
        raise insufficient_credit(r.available, r.holding, estimate.credits)
    if r.result is Reserved.CONFLICT:
        raise request_id_in_use()
    if r.result is Reserved.UNAVAILABLE:
        raise guard_unavailable()
    if r.result is Reserved.CLAMPED:
        tokens = clamped_output(chat, estimate, r.held, started_ms=ex.started_ms)
        if tokens < min(alias.clamp_min_tokens, estimate.output_tokens):
            ex.guard_decision = GuardDecision.BLOCK
            raise insufficient_credit(r.available, r.holding, estimate.credits)
        ex.chat = chat = with_output_limit(chat, tokens)
    return chat


def settle_hold(guard: Guard | None, ex: Exchange, settlement: Settlement | None) -> None:
    """Hand the request's hold to the ledger as its charge (synchronous: the guard
    writes it in the background). A request that failed to settle keeps its hold at
    the estimate until it expires: never less than what it may have cost."""
    hold = ex.hold
    if guard is None or hold is None or settlement is None:
        return
    event = settlement.event
    guard.settle(hold, 0 if event is None else event.credits)
