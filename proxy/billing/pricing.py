"""Price rules and the credit arithmetic: pure functions, no I/O.

Rates are credits per 1,000,000 tokens. A request is priced with the version of
its rule in force when it started (`PriceRule.in_force`), as::

    rates = the version's rates, or those of its highest long-context tier whose
            above_prompt_tokens the prompt exceeds (all-or-nothing)
    rates = the service tier's rates, when the request's service_tier names one
            that has rates; tier_multiplier = that tier's multiplier (else 1)

    text_in   = prompt_tokens - cached_tokens - cache_write_tokens - audio_prompt_tokens
    text_out  = completion_tokens - reasoning_tokens - audio_completion_tokens
    raw = ( text_in                 * input
          + cached_tokens           * cached_input
          + cache_write_tokens      * cache_write
          + audio_prompt_tokens     * audio_input
          + text_out                * output
          + reasoning_tokens        * reasoning
          + audio_completion_tokens * audio_output ) / 1_000_000
          * multiplier * tier_multiplier
        + request_fee

    credits = ceil(raw)                        # always rounded UP to a whole credit
    credits = max(credits, min_charge)         # only when the request used any token
    credits = 0                                # when it used no token at all
    credits = min(credits, 10**12)             # MAX_CREDITS: every ledger can apply it

Cached, cache-write and audio tokens are parts of the prompt; reasoning and audio
tokens parts of the completion (subsets, never added on top). `cached_input` and
`cache_write` default to `input`, `reasoning` to `output`, `audio_input` /
`audio_output` (when a rule has none) to `input` / `output`, multipliers to 1,
`min_charge` and `request_fee` to 0. Rates come from proxy.config.price_rules.

Rounding: the sum is computed exactly in `Decimal` (YAML floats are read through
`str()`, so `2.5` is exactly 2.5 and 10^12 tokens lose no digit), then rounded up
once, at the end, per request. Any non-zero usage at a non-zero rate therefore costs
at least 1 credit (1 token at 2.5 credits/M is 0.0000025 -> 1 credit); nothing is
ever rounded down, so the proxy never gives away fractions of a credit.
"""

from __future__ import annotations

import math
from decimal import (
    MAX_EMAX,
    MAX_PREC,
    MIN_EMIN,
    ROUND_CEILING,
    ROUND_FLOOR,
    Context,
    Decimal,
    Inexact,
    InvalidOperation,
    Overflow,
)
from typing import Final

from proxy.config.model import FREE_RULE_ID, PriceRule, PriceSchedule, Rates
from proxy.config.price_rules import DEFAULT_SERVICE_TIER
from proxy.contract.charge_event import MAX_CREDITS
from proxy.contract.records import record
from proxy.contract.usage import Usage

_TOKENS_PER_UNIT: Final = 6  # rates are per 10**6 tokens


@record
class Charge:
    """What one request costs, with the token counts it was priced on."""

    rule_id: str  # PriceRule.id, or FREE_RULE_ID for free aliases
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    credits: int
    # The version priced with: its effective_from, None for the undated rates.
    rule_version: str | None = None
    cache_write_tokens: int = 0
    audio_prompt_tokens: int = 0
    audio_completion_tokens: int = 0


# ---------------------------------------------------------------------------
# pricing


def price(
    rule: PriceRule | None,
    usage: Usage,
    *,
    service_tier: str | None = None,
    started_ms: int = 0,
) -> Charge:
    """Price `usage` with `rule`; `rule=None` is an alias marked free (0 credits).

    `started_ms` (unix ms, when the request started) picks the rule's version;
    `service_tier` is the request's `service_tier` value (validated against the
    same version by proxy.billing.price_params before the call).

    Raises ValueError for impossible usage (a negative or non-integer count, parts
    that exceed their whole) or a service tier the version does not price. Pricing
    never guesses: the caller (metering) decides whether to clamp such a report.
    """
    prompt = usage.prompt_tokens
    cached = usage.cached_tokens
    write = usage.cache_write_tokens
    audio_in = usage.audio_prompt_tokens
    completion = usage.completion_tokens
    reasoning = usage.reasoning_tokens
    audio_out = usage.audio_completion_tokens
    if not (
        type(prompt) is int
        and type(cached) is int
        and type(write) is int
        and type(audio_in) is int
        and type(completion) is int
        and type(reasoning) is int
        and type(audio_out) is int
        and prompt >= 0
        and cached >= 0
        and write >= 0
        and audio_in >= 0
        and completion >= 0
        and reasoning >= 0
        and audio_out >= 0
    ):  # checked one by one, for the error that names the count (or an int subclass)
        prompt = _count(prompt, "prompt_tokens")
        cached = _count(cached, "cached_tokens")
        write = _count(write, "cache_write_tokens")
        audio_in = _count(audio_in, "audio_prompt_tokens")
        completion = _count(completion, "completion_tokens")
        reasoning = _count(reasoning, "reasoning_tokens")
        audio_out = _count(audio_out, "audio_completion_tokens")
    if cached > prompt:
        raise ValueError(f"cached_tokens ({cached}) exceeds prompt_tokens ({prompt})")
    if reasoning > completion:
        raise ValueError(f"reasoning_tokens ({reasoning}) exceeds completion_tokens ({completion})")
    if cached + write + audio_in > prompt:
        raise ValueError(
            f"cached + cache_write + audio prompt tokens exceed prompt_tokens ({prompt})"
        )
    if reasoning + audio_out > completion:
        raise ValueError(f"reasoning + audio completion tokens exceed completion ({completion})")
    version: str | None = None
    if rule is None:
        credits = 0
        rule_id = FREE_RULE_ID
    else:
        rule_id = rule.id
        schedule = rule.in_force(started_ms)
        version = schedule.effective_from
        text_in = prompt - cached - write - audio_in
        text_out = completion - reasoning - audio_out
        counts = (text_in, cached, write, audio_in, text_out, reasoning, audio_out)
        credits = _credits(schedule, service_tier, prompt, counts)
    # Positional, in field order (rule_id, prompt, cached, completion, reasoning,
    # credits, rule_version, cache_write, audio_prompt, audio_completion): cheaper.
    return Charge(
        rule_id, prompt, cached, completion, reasoning, credits, version, write, audio_in, audio_out
    )


def rates_for(
    schedule: PriceSchedule, prompt_tokens: int, service_tier: str | None
) -> tuple[Rates, Decimal]:
    """The rates and the combined multiplier that price a request."""
    rates = schedule.rates
    for tier in schedule.tiers:  # ascending: the last one exceeded wins
        if prompt_tokens > tier.above_prompt_tokens:
            rates = tier.rates
    multiplier = schedule.multiplier
    if service_tier is not None:
        st = schedule.service_tiers.get(service_tier)
        if st is None:
            if service_tier != DEFAULT_SERVICE_TIER:
                raise ValueError(f"service_tier {service_tier!r} is not priced by this rule")
        else:
            rates = st.rates or rates
            multiplier = multiplier * st.multiplier
    return rates, multiplier


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


def _credits(
    schedule: PriceSchedule, service_tier: str | None, prompt: int, counts: tuple[int, ...]
) -> int:
    if sum(counts) == 0:
        return 0  # nothing used, nothing owed; min_charge and request_fee do not apply
    rates, multiplier = rates_for(schedule, prompt, service_tier)
    terms = _terms(rates, multiplier, schedule.request_fee)
    if terms is None:  # a rate no fraction can hold: the Decimal sum says why
        return _credits_decimal(schedule, rates, multiplier, counts)
    weights, scale, fee, _, _ = terms
    # raw = (sum(count * weight) + fee) / scale, exactly: integers only.
    c0, c1, c2, c3, c4, c5, c6 = counts
    w0, w1, w2, w3, w4, w5, w6 = weights
    num = fee + c0 * w0 + c1 * w1 + c2 * w2 + c3 * w3 + c4 * w4 + c5 * w5 + c6 * w6
    credits = -(-num // scale)  # ceil (scale > 0)
    return min(max(credits, schedule.min_charge), MAX_CREDITS)


# The exact integer form of (rates, multiplier, request_fee), by identity: these are
# config objects, alive as long as the config (the cache holds them, so an id cannot
# be reused while its entry exists; each hit also checks identity).
# (weights, scale, fee term, the dearest input kind's weight, the dearest output's)
_Terms = tuple[tuple[int, ...], int, int, int, int]
_TERMS: dict[tuple[int, int, int], tuple[Rates, Decimal, Decimal, _Terms | None]] = {}
_TERMS_MAX = 4096


def _terms(rates: Rates, multiplier: Decimal, fee: Decimal) -> _Terms | None:
    """`raw` of the formula as (sum(count * weight) + fee_term) / scale with integer
    weights, so a request is priced in plain integer arithmetic: the same exact value
    the Decimal sum gives (every Decimal is a fraction n / d), ~60k fewer interpreter
    instructions a request. None when a rate is not a finite number."""
    key = (id(rates), id(multiplier), id(fee))
    hit = _TERMS.get(key)
    if hit is not None and hit[0] is rates and hit[1] is multiplier and hit[2] is fee:
        return hit[3]
    terms: _Terms | None
    try:
        ratios = [d.as_integer_ratio() for d in _per_kind(rates)]
        m_num, m_den = multiplier.as_integer_ratio()
        f_num, f_den = fee.as_integer_ratio()
    except (ValueError, OverflowError):  # NaN or infinity
        terms = None
    else:
        den = math.lcm(*(d for _, d in ratios))
        # raw = sum(c * n_i * den / d_i) * m_num / (den * m_den * 10**6) + f_num / f_den
        scale = den * m_den * 10**_TOKENS_PER_UNIT * f_den
        weights = tuple(n * (den // d) * m_num * f_den for n, d in ratios)
        kinds = _per_kind(rates)  # upper_bound's: the dearest input (0-3), output (4-6)
        w_in = weights[max(range(4), key=kinds.__getitem__)]
        w_out = weights[max(range(4, 7), key=kinds.__getitem__)]
        terms = (weights, scale, f_num * den * m_den * 10**_TOKENS_PER_UNIT, w_in, w_out)
    if len(_TERMS) >= _TERMS_MAX:
        _TERMS.clear()
    _TERMS[key] = (rates, multiplier, fee, terms)
    return terms


def _per_kind(rates: Rates) -> tuple[Decimal, ...]:
    """The rate of each count, in the order of `price`'s counts."""
    return (
        rates.input,
        rates.cached_input,
        rates.cache_write,
        rates.input if rates.audio_input is None else rates.audio_input,
        rates.output,
        rates.reasoning,
        rates.output if rates.audio_output is None else rates.audio_output,
    )


def _credits_decimal(
    schedule: PriceSchedule, rates: Rates, multiplier: Decimal, counts: tuple[int, ...]
) -> int:
    """The formula in Decimal arithmetic: the reference `_terms` is checked against
    (tests/billing/test_pricing.py), and the path for rates that are not numbers."""
    per_kind = _per_kind(rates)
    # A fresh context per call: contexts record flags (they are mutable), so a shared
    # one would be hidden module state. MAX_PREC makes + and * exact for any sizes we
    # can meet; the Inexact trap turns a would-be silent rounding into an error.
    ctx = Context(
        prec=MAX_PREC,
        Emax=MAX_EMAX,
        Emin=MIN_EMIN,
        traps=[Inexact, Overflow, InvalidOperation],
    )
    total = Decimal(0)
    for count, rate in zip(counts, per_kind, strict=True):
        total = ctx.fma(count, rate, total)
    total = ctx.multiply(total, multiplier)
    # Dividing by 10**6 is an exponent shift (scaleb), exact by construction.
    raw = ctx.add(total.scaleb(-_TOKENS_PER_UNIT, ctx), schedule.request_fee)
    credits = int(raw.to_integral_value(rounding=ROUND_CEILING, context=ctx))
    # Capped so that every event serialises and every ledger can add it up
    # (proxy.contract.charge_event); only absurd usage at absurd rates gets there.
    return min(max(credits, schedule.min_charge), MAX_CREDITS)


# ---------------------------------------------------------------------------
# bounds for admission (proxy.billing.estimate)


def upper_bound(
    rule: PriceRule | None,
    prompt_tokens: int,
    output_tokens: int,
    *,
    service_tier: str | None = None,
    started_ms: int = 0,
) -> int:
    """The most `prompt_tokens` in and `output_tokens` out can cost under `rule`:
    every prompt token at the dearest input rate (input, cache write, audio), every
    output token at the dearest output rate (output, reasoning, audio), the same
    multipliers, fee, minimum, rounding and cap as `price`. Never below `price` of
    any usage with at most these counts (tests/billing/test_estimate.py). In exact
    integers, as `price` (`_upper_bound_decimal` is the reference it is tested
    against): every reservation prices its estimate."""
    if rule is None or prompt_tokens + output_tokens <= 0:
        return 0
    schedule = rule.in_force(started_ms)
    rates, multiplier = rates_for(schedule, prompt_tokens, service_tier)
    terms = _terms(rates, multiplier, schedule.request_fee)
    if terms is None:
        return _upper_bound_decimal(schedule, rates, multiplier, prompt_tokens, output_tokens)
    _, scale, fee, w_in, w_out = terms
    credits = -(-(fee + prompt_tokens * w_in + output_tokens * w_out) // scale)
    return min(max(credits, schedule.min_charge), MAX_CREDITS)


def _upper_bound_decimal(
    schedule: PriceSchedule, rates: Rates, multiplier: Decimal, prompt: int, output: int
) -> int:
    """`upper_bound`'s formula in Decimal arithmetic (the reference it is tested
    against, and the path for rates that are not numbers)."""
    in_rate, out_rate = _dearest(rates)
    ctx = _exact()
    total = ctx.fma(prompt, in_rate, ctx.multiply(output, out_rate))
    total = ctx.multiply(total, multiplier)
    raw = ctx.add(total.scaleb(-_TOKENS_PER_UNIT, ctx), schedule.request_fee)
    credits = int(raw.to_integral_value(rounding=ROUND_CEILING, context=ctx))
    return min(max(credits, schedule.min_charge), MAX_CREDITS)


def affordable_output(
    rule: PriceRule | None,
    prompt_tokens: int,
    credits: int,
    *,
    service_tier: str | None = None,
    started_ms: int = 0,
) -> int | None:
    """The most output tokens whose `upper_bound` with `prompt_tokens` fits in
    `credits` (0 when not even the prompt does); None when output costs nothing."""
    if rule is None:
        return None
    schedule = rule.in_force(started_ms)
    rates, multiplier = rates_for(schedule, prompt_tokens, service_tier)
    in_rate, out_rate = _dearest(rates)
    per_token = out_rate * multiplier
    if per_token <= 0:
        return None
    ctx = _exact()
    prompt_cost = ctx.multiply(ctx.multiply(prompt_tokens, in_rate), multiplier)
    room = ctx.subtract(
        ctx.subtract(Decimal(credits), schedule.request_fee).scaleb(_TOKENS_PER_UNIT, ctx),
        prompt_cost,
    )
    if room < 0:
        return 0
    # Division is inexact: a context that rounds, then the bound checked exactly.
    tokens = int((room / per_token).to_integral_value(rounding=ROUND_FLOOR))
    while (
        tokens > 0
        and upper_bound(
            rule, prompt_tokens, tokens, service_tier=service_tier, started_ms=started_ms
        )
        > credits
    ):
        tokens -= 1 + tokens // 1000
    return max(tokens, 0)


def _dearest(rates: Rates) -> tuple[Decimal, Decimal]:
    audio_in = rates.input if rates.audio_input is None else rates.audio_input
    audio_out = rates.output if rates.audio_output is None else rates.audio_output
    return (
        max(rates.input, rates.cache_write, rates.cached_input, audio_in),
        max(rates.output, rates.reasoning, audio_out),
    )


def _exact() -> Context:
    return Context(
        prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[Inexact, Overflow, InvalidOperation]
    )
