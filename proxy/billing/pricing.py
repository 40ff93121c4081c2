"""Price rules and the credit arithmetic: pure functions, no I/O.

Rates are credits per 1,000,000 tokens. A request is priced as::

    raw = ( (prompt_tokens - cached_tokens)          * input
          + cached_tokens                            * cached_input
          + (completion_tokens - reasoning_tokens)   * output
          + reasoning_tokens                         * reasoning ) / 1_000_000 * multiplier

    credits = ceil(raw)                        # always rounded UP to a whole credit
    credits = max(credits, min_charge)         # only when the request used any token
    credits = 0                                # when it used no token at all
    credits = min(credits, 10**12)             # MAX_CREDITS: every ledger can apply it

`cached_tokens` is the part of the prompt served from the provider's cache and
`reasoning_tokens` the part of the completion spent on hidden reasoning (OpenAI's
usage semantics: both are subsets, never added on top). `cached_input` defaults to
`input`, `reasoning` to `output`, `multiplier` to 1 and `min_charge` to 0.

Rates come from the `price_rules` section (proxy.config.load).

Rounding: the sum is computed exactly in `Decimal` (YAML floats are read through
`str()`, so `2.5` is exactly 2.5 and 10^12 tokens lose no digit), then rounded up
once, at the end, per request. Any non-zero usage at a non-zero rate therefore costs
at least 1 credit (1 token at 2.5 credits/M is 0.0000025 -> 1 credit); nothing is
ever rounded down, so the proxy never gives away fractions of a credit.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import (
    MAX_EMAX,
    MAX_PREC,
    MIN_EMIN,
    ROUND_CEILING,
    Context,
    Inexact,
    InvalidOperation,
    Overflow,
)
from typing import Final

from proxy.config.model import FREE_RULE_ID, PriceRule
from proxy.contract.charge_event import MAX_CREDITS
from proxy.contract.usage import Usage

_TOKENS_PER_UNIT: Final = 6  # rates are per 10**6 tokens


@dataclass(frozen=True, slots=True)
class Charge:
    """What one request costs, with the token counts it was priced on."""

    rule_id: str  # PriceRule.id, or FREE_RULE_ID for free aliases
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    credits: int


# ---------------------------------------------------------------------------
# pricing


def price(rule: PriceRule | None, usage: Usage) -> Charge:
    """Price `usage` with `rule`; `rule=None` is an alias marked free (0 credits).

    Raises ValueError for impossible usage (a negative or non-integer count,
    cached > prompt, reasoning > completion). Pricing never guesses: the caller
    (metering) decides whether to clamp such a report or reject it.
    """
    prompt = _count(usage.prompt_tokens, "prompt_tokens")
    cached = _count(usage.cached_tokens, "cached_tokens")
    completion = _count(usage.completion_tokens, "completion_tokens")
    reasoning = _count(usage.reasoning_tokens, "reasoning_tokens")
    if cached > prompt:
        raise ValueError(f"cached_tokens ({cached}) exceeds prompt_tokens ({prompt})")
    if reasoning > completion:
        raise ValueError(f"reasoning_tokens ({reasoning}) exceeds completion_tokens ({completion})")
    if rule is None:
        credits = 0
        rule_id = FREE_RULE_ID
    else:
        rule_id = rule.id
        credits = _credits(rule, prompt - cached, cached, completion - reasoning, reasoning)
    return Charge(
        rule_id=rule_id,
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        reasoning_tokens=reasoning,
        credits=credits,
    )


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


def _credits(rule: PriceRule, uncached: int, cached: int, plain: int, reasoning: int) -> int:
    if uncached + cached + plain + reasoning == 0:
        return 0  # nothing used, nothing owed; min_charge does not apply
    # A fresh context per call: contexts record flags (they are mutable), so a shared
    # one would be hidden module state. MAX_PREC makes + and * exact for any sizes we
    # can meet; the Inexact trap turns a would-be silent rounding into an error.
    ctx = Context(
        prec=MAX_PREC,
        Emax=MAX_EMAX,
        Emin=MIN_EMIN,
        traps=[Inexact, Overflow, InvalidOperation],
    )
    total = ctx.multiply(uncached, rule.input)
    total = ctx.fma(cached, rule.cached_input, total)
    total = ctx.fma(plain, rule.output, total)
    total = ctx.fma(reasoning, rule.reasoning, total)
    total = ctx.multiply(total, rule.multiplier)
    # Dividing by 10**6 is an exponent shift (scaleb), exact by construction.
    raw = total.scaleb(-_TOKENS_PER_UNIT, ctx)
    credits = int(raw.to_integral_value(rounding=ROUND_CEILING, context=ctx))
    # Capped so that every event serialises and every ledger can add it up
    # (proxy.contract.charge_event); only absurd usage at absurd rates gets there.
    return min(max(credits, rule.min_charge), MAX_CREDITS)
