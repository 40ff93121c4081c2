from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.billing.pricing import Charge, price
from proxy.config import PriceRule, parse_price_rules
from proxy.config.model import FREE_RULE_ID, PriceSchedule, Rates
from proxy.contract.charge_event import MAX_CREDITS
from proxy.contract.usage import Usage
from proxy.errors import ConfigError


def rule(**prices: object) -> PriceRule:
    return parse_price_rules({"r": {"input": 2.5, "output": 10, **prices}})["r"]


# ---------------------------------------------------------------------------
# parsing


def test_parse_full_rule_reads_yaml_floats_exactly() -> None:
    rules = parse_price_rules(
        {
            "gpt4o": {
                "input": 2.5,
                "cached_input": 1.25,
                "output": 10,
                "reasoning": 12,
                "multiplier": 0.1,
                "min_charge": 3,
                "cache_write": 3.125,
                "audio_input": 40,
                "audio_output": 80,
                "request_fee": 0.5,
            }
        }
    )
    assert rules == {
        "gpt4o": PriceRule(
            id="gpt4o",
            schedules=(
                PriceSchedule(
                    rates=Rates(
                        input=Decimal("2.5"),
                        output=Decimal("10"),
                        cached_input=Decimal("1.25"),
                        reasoning=Decimal("12"),
                        cache_write=Decimal("3.125"),
                        audio_input=Decimal(40),
                        audio_output=Decimal(80),
                    ),
                    multiplier=Decimal("0.1"),  # not 0.1000000000000000055511...
                    min_charge=3,
                    request_fee=Decimal("0.5"),
                ),
            ),
        )
    }


def test_parse_defaults() -> None:
    assert parse_price_rules({"m": {"input": 3, "output": 7}})["m"] == PriceRule(
        id="m",
        schedules=(
            PriceSchedule(
                rates=Rates(
                    input=Decimal(3),
                    output=Decimal(7),
                    cached_input=Decimal(3),
                    reasoning=Decimal(7),
                    cache_write=Decimal(3),
                    audio_input=None,
                    audio_output=None,
                ),
                multiplier=Decimal(1),
                min_charge=0,
                request_fee=Decimal(0),
            ),
        ),
    )


def test_absent_section_means_no_rules() -> None:
    assert parse_price_rules(None) == {}
    assert parse_price_rules({}) == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (["m"], "price_rules: must be a mapping"),
        ({"m": 2.5}, "price_rules.m: must be a mapping"),
        ({"m": None}, "price_rules.m: must be a mapping"),
        ({1: {"input": 1, "output": 1}}, "price_rules.1: rule id must be"),
        ({"free": {"input": 1, "output": 1}}, "price_rules.free: the id 'free' is reserved"),
        ({"m": {"output": 10}}, "price_rules.m.input: required"),
        ({"m": {"input": 1}}, "price_rules.m.output: required"),
    ],
)
def test_section_errors_name_the_key_path(raw: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_price_rules(raw)
    assert str(info.value).startswith(message)


NUMBER = "must be a non-negative number, got"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ouput", 2, "price_rules.m.ouput: unknown key (allowed: audio_input, audio_output"),
        ("input", "abc", f"price_rules.m.input: {NUMBER} 'abc'"),
        ("input", "2.5", f"price_rules.m.input: {NUMBER} '2.5'"),  # quoted numbers are typos too
        ("input", True, f"price_rules.m.input: {NUMBER} True"),
        ("input", None, f"price_rules.m.input: {NUMBER} None"),
        ("output", -1, f"price_rules.m.output: {NUMBER} -1"),
        ("output", float("nan"), f"price_rules.m.output: {NUMBER} nan"),
        ("output", float("inf"), f"price_rules.m.output: {NUMBER} inf"),
        ("output", [1], f"price_rules.m.output: {NUMBER} [1]"),
        ("cached_input", -0.5, f"price_rules.m.cached_input: {NUMBER} -0.5"),
        ("reasoning", "x", f"price_rules.m.reasoning: {NUMBER} 'x'"),
        ("multiplier", -2, f"price_rules.m.multiplier: {NUMBER} -2"),
        ("min_charge", 1.5, "price_rules.m.min_charge: must be a non-negative integer"),
        ("min_charge", -1, "price_rules.m.min_charge: must be a non-negative integer"),
        ("min_charge", False, "price_rules.m.min_charge: must be a non-negative integer"),
    ],
)
def test_rule_errors_name_the_key_path(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_price_rules({"m": {"input": 1, "output": 1, key: value}})
    assert str(info.value).startswith(message)


def test_config_error_uses_the_given_path() -> None:
    with pytest.raises(ConfigError, match=r"^models\.yaml:price_rules\.m\.input: required"):
        parse_price_rules({"m": {"output": 1}}, path="models.yaml:price_rules")


# ---------------------------------------------------------------------------
# pricing


@pytest.mark.parametrize(
    ("prices", "usage", "credits"),
    [
        # zero tokens cost nothing, even with a minimum charge
        ({}, Usage(), 0),
        ({"min_charge": 5}, Usage(), 0),
        # rounding up: 1 token at 2.5/M is 0.0000025 credits -> 1
        ({}, Usage(prompt_tokens=1), 1),
        ({}, Usage(completion_tokens=1), 1),
        # exact multiples are not bumped: 400_000 * 2.5/M = 1.0 exactly
        ({}, Usage(prompt_tokens=400_000), 1),
        ({}, Usage(prompt_tokens=400_001), 2),
        # 1M in at 2.5 + 1M out at 10 = 12.5 -> 13
        ({}, Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000), 13),
        # cached tokens are part of the prompt and billed at the cached rate:
        # 600k*2.5 + 400k*1.25 = 1.5 + 0.5 = 2.0 (input rate alone would be 2.5 -> 3)
        ({"cached_input": 1.25}, Usage(prompt_tokens=1_000_000, cached_tokens=400_000), 2),
        # cached_input defaults to input
        ({}, Usage(prompt_tokens=1_000_000, cached_tokens=1_000_000), 3),
        # reasoning tokens are part of the completion, billed at the reasoning rate:
        # 500k*10 + 500k*30 = 5 + 15 = 20 (output rate alone would be 10)
        ({"reasoning": 30}, Usage(completion_tokens=1_000_000, reasoning_tokens=500_000), 20),
        # reasoning defaults to output
        ({}, Usage(completion_tokens=1_000_000, reasoning_tokens=500_000), 10),
        # multiplier applies to the raw sum before rounding: 12.5 * 0.1 = 1.25 -> 2
        ({"multiplier": 0.1}, Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000), 2),
        ({"multiplier": 2}, Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000), 25),
        # min_charge lifts small requests, not large ones
        ({"min_charge": 5}, Usage(prompt_tokens=1), 5),
        ({"min_charge": 5}, Usage(prompt_tokens=10_000_000), 25),
        # zero rates: usage costs nothing unless a minimum is set
        ({"input": 0, "output": 0}, Usage(prompt_tokens=99, completion_tokens=99), 0),
        ({"input": 0, "output": 0, "min_charge": 1}, Usage(prompt_tokens=1), 1),
        # 0.1 from YAML is exactly 0.1: 10M * 0.1/M = 1.0, not 1.0000000000000000555 -> 2
        ({"input": 0.1}, Usage(prompt_tokens=10_000_000), 1),
    ],
)
def test_price_table(prices: dict[str, object], usage: Usage, credits: int) -> None:
    charge = price(rule(**prices), usage)
    assert charge.credits == credits
    assert charge.rule_id == "r"


def test_charge_records_the_counts_it_priced() -> None:
    usage = Usage(prompt_tokens=10, completion_tokens=20, cached_tokens=3, reasoning_tokens=4)
    assert price(rule(), usage) == Charge(
        rule_id="r",
        prompt_tokens=10,
        cached_tokens=3,
        completion_tokens=20,
        reasoning_tokens=4,
        credits=1,
    )


def test_huge_counts_are_exact() -> None:
    # (10^12 - 7) * 10 + 7 * 10.000001 = 10^13 + 0.000007, / 10^6 = 10^7 + 7e-12 -> 10^7 + 1.
    # A float cannot hold 10^13 + 0.000007 (its step there is ~0.002) and would say 10^7.
    r = rule(output=10, reasoning=10.000001)
    charge = price(r, Usage(completion_tokens=10**12, reasoning_tokens=7))
    assert charge.credits == 10_000_001
    # and with everything at once, still exact
    r = rule(cached_input=1.25)
    usage = Usage(
        prompt_tokens=10**12,
        cached_tokens=10**12 - 1,
        completion_tokens=10**12,
        reasoning_tokens=7,
    )
    # 1*2.5 + (10^12-1)*1.25 + (10^12-7)*10 + 7*10 = 11.25e12 + 1.25 -> /1e6 = 11250000.00000125
    assert price(r, usage).credits == 11_250_001


def test_free_rule_costs_nothing() -> None:
    usage = Usage(prompt_tokens=10**9, completion_tokens=10**9, cached_tokens=5)
    charge = price(None, usage)
    assert charge.rule_id == FREE_RULE_ID == "free"
    assert charge.credits == 0
    assert (charge.prompt_tokens, charge.cached_tokens) == (10**9, 5)


@pytest.mark.parametrize("rule_or_free", [rule(), None], ids=["priced", "free"])
@pytest.mark.parametrize(
    ("usage", "message"),
    [
        (Usage(prompt_tokens=5, cached_tokens=6), "cached_tokens .* exceeds prompt_tokens"),
        (Usage(completion_tokens=5, reasoning_tokens=6), "reasoning_tokens .* exceeds"),
        (Usage(prompt_tokens=-1), "prompt_tokens must not be negative"),
        (Usage(completion_tokens=-1), "completion_tokens must not be negative"),
        (Usage(prompt_tokens=5, cached_tokens=-1), "cached_tokens must not be negative"),
        (Usage(completion_tokens=5, reasoning_tokens=-1), "reasoning_tokens must not be"),
        (Usage(prompt_tokens=1.5), "prompt_tokens must be an integer"),  # type: ignore[arg-type]
        (Usage(prompt_tokens=True), "prompt_tokens must be an integer"),
    ],
)
def test_impossible_usage_is_rejected(
    rule_or_free: PriceRule | None, usage: Usage, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        price(rule_or_free, usage)


# An independent reference (exact rationals) for the whole formula, over random inputs.
_rates = st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False, allow_infinity=False)
_counts = st.integers(min_value=0, max_value=10**13)


@given(
    rates=st.tuples(_rates, _rates, _rates, _rates, _rates),
    min_charge=st.integers(min_value=0, max_value=50),
    counts=st.tuples(_counts, _counts, _counts, _counts),
)
def test_price_matches_rational_reference(
    rates: tuple[Decimal, ...], min_charge: int, counts: tuple[int, ...]
) -> None:
    f_rates = dict(zip(("input", "cached_input", "output", "reasoning"), rates, strict=False))
    r = PriceRule(
        "p",
        (
            PriceSchedule(
                Rates(
                    input=f_rates["input"],
                    output=f_rates["output"],
                    cached_input=f_rates["cached_input"],
                    reasoning=f_rates["reasoning"],
                    cache_write=f_rates["input"],
                ),
                multiplier=rates[4],
                min_charge=min_charge,
            ),
        ),
    )
    uncached, cached, plain, reasoning = counts
    usage = Usage(
        prompt_tokens=uncached + cached,
        cached_tokens=cached,
        completion_tokens=plain + reasoning,
        reasoning_tokens=reasoning,
    )
    f_in, f_cached, f_out, f_reason, f_mult = (Fraction(x) for x in rates)
    raw = (
        (uncached * f_in + cached * f_cached + plain * f_out + reasoning * f_reason)
        / 1_000_000
        * f_mult
    )
    expected = 0 if sum(counts) == 0 else max(math.ceil(raw), min_charge)
    # Capped so every ledger can apply it (proxy.contract.charge_event.MAX_CREDITS).
    assert price(r, usage).credits == min(expected, MAX_CREDITS)


# The integer path (`_terms`) against the Decimal formula it replaces, every term used.
_fine = st.decimals(min_value=0, max_value=10**6, places=8, allow_nan=False, allow_infinity=False)


@given(
    rates=st.tuples(*([_fine] * 7)),
    multiplier=_fine,
    fee=_fine,
    min_charge=st.integers(min_value=0, max_value=50),
    counts=st.tuples(*([_counts] * 7)),
)
def test_integer_pricing_matches_the_decimal_formula(
    rates: tuple[Decimal, ...],
    multiplier: Decimal,
    fee: Decimal,
    min_charge: int,
    counts: tuple[int, ...],
) -> None:
    from proxy.billing.pricing import _credits, _credits_decimal

    r = Rates(*rates)
    schedule = PriceSchedule(r, multiplier=multiplier, min_charge=min_charge, request_fee=fee)
    assert _credits(schedule, None, 0, counts) == (
        0 if sum(counts) == 0 else _credits_decimal(schedule, r, multiplier, counts)
    )


def test_integer_pricing_keeps_rules_apart() -> None:
    # Cached per rates object: two rules priced in turn each keep their own price.
    cheap, dear = rule(input=1, output=1), rule(input=1000, output=1000)
    usage = Usage(prompt_tokens=10**6, completion_tokens=10**6)
    for _ in range(3):
        assert price(cheap, usage).credits == 2
        assert price(dear, usage).credits == 2000
