"""Price rules and the credit arithmetic: pure functions, no I/O.

Rates are credits per 1,000,000 tokens. A request is priced as::

    raw = ( (prompt_tokens - cached_tokens)          * input
          + cached_tokens                            * cached_input
          + (completion_tokens - reasoning_tokens)   * output
          + reasoning_tokens                         * reasoning ) / 1_000_000 * multiplier

    credits = ceil(raw)                        # always rounded UP to a whole credit
    credits = max(credits, min_charge)         # only when the request used any token
    credits = 0                                # when it used no token at all

`cached_tokens` is the part of the prompt served from the provider's cache and
`reasoning_tokens` the part of the completion spent on hidden reasoning (OpenAI's
usage semantics: both are subsets, never added on top). `cached_input` defaults to
`input`, `reasoning` to `output`, `multiplier` to 1 and `min_charge` to 0.

Rounding: the sum is computed exactly in `Decimal` (YAML floats are read through
`str()`, so `2.5` is exactly 2.5 and 10^12 tokens lose no digit), then rounded up
once, at the end, per request. Any non-zero usage at a non-zero rate therefore costs
at least 1 credit (1 token at 2.5 credits/M is 0.0000025 -> 1 credit); nothing is
ever rounded down, so the proxy never gives away fractions of a credit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import (
    MAX_EMAX,
    MAX_PREC,
    MIN_EMIN,
    ROUND_CEILING,
    Context,
    Decimal,
    Inexact,
    InvalidOperation,
    Overflow,
)
from typing import Final

from proxy.errors import ConfigError
from proxy.usage import Usage

FREE_RULE_ID: Final = "free"
"""`Charge.rule_id` for aliases marked `free: true`; reserved, no price rule may use it."""

_TOKENS_PER_UNIT: Final = 6  # rates are per 10**6 tokens
_RATE_KEYS: Final = ("input", "cached_input", "output", "reasoning", "multiplier")
_REQUIRED_KEYS: Final = ("input", "output")
_KNOWN_KEYS: Final = frozenset((*_RATE_KEYS, "min_charge"))


@dataclass(frozen=True, slots=True)
class PriceRule:
    """One `price_rules` entry; rates in credits per 1M tokens."""

    id: str
    input: Decimal
    cached_input: Decimal
    output: Decimal
    reasoning: Decimal
    multiplier: Decimal = Decimal(1)
    min_charge: int = 0


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
# config parsing


def parse_price_rules(raw: object, path: str = "price_rules") -> dict[str, PriceRule]:
    """Parse the `price_rules` mapping; an absent section (None) means no rules."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{path}: must be a mapping of rule id to prices, got {type(raw).__name__}"
        )
    rules: dict[str, PriceRule] = {}
    for rule_id, body in raw.items():
        if not isinstance(rule_id, str) or not rule_id:
            raise ConfigError(f"{path}.{rule_id!r}: rule id must be a non-empty string")
        if rule_id == FREE_RULE_ID:
            # Events carry price_rule="free" for free aliases; a real rule with that
            # name would make the ledger unable to tell the two apart.
            raise ConfigError(
                f"{path}.{rule_id}: the id '{FREE_RULE_ID}' is reserved for aliases "
                "marked free: true"
            )
        rules[rule_id] = _parse_rule(rule_id, body, f"{path}.{rule_id}")
    return rules


def _parse_rule(rule_id: str, body: object, path: str) -> PriceRule:
    if not isinstance(body, Mapping):
        raise ConfigError(f"{path}: must be a mapping of prices, got {type(body).__name__}")
    for key in body:
        if key not in _KNOWN_KEYS:
            # Typo protection: "ouput: 10" must not silently fall back to a default.
            expected = ", ".join(sorted(_KNOWN_KEYS))
            raise ConfigError(f"{path}.{key}: unknown key (expected one of: {expected})")
    for key in _REQUIRED_KEYS:
        if key not in body:
            raise ConfigError(f"{path}.{key}: required")
    input_rate = _rate(body["input"], f"{path}.input")
    output_rate = _rate(body["output"], f"{path}.output")
    cached = body.get("cached_input")
    reasoning = body.get("reasoning")
    multiplier = body.get("multiplier")
    return PriceRule(
        id=rule_id,
        input=input_rate,
        cached_input=input_rate if cached is None else _rate(cached, f"{path}.cached_input"),
        output=output_rate,
        reasoning=output_rate if reasoning is None else _rate(reasoning, f"{path}.reasoning"),
        multiplier=Decimal(1) if multiplier is None else _rate(multiplier, f"{path}.multiplier"),
        min_charge=_min_charge(body.get("min_charge", 0), f"{path}.min_charge"),
    )


def _rate(value: object, path: str) -> Decimal:
    # bool is an int subclass: "input: yes" must not become a rate of 1.
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ConfigError(f"{path}: must be a non-negative number, got {value!r}")
    # str() first: Decimal(2.5) is exact but Decimal(0.1) is 0.1000000000000000055...;
    # str() gives the short repr the YAML author actually wrote.
    number = Decimal(str(value))
    if not number.is_finite() or number < 0:
        raise ConfigError(f"{path}: must be a non-negative number, got {value!r}")
    return number


def _min_charge(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: must be a non-negative integer (credits), got {value!r}")
    return value


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
    return max(credits, rule.min_charge)
