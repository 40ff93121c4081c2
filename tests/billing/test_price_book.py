"""Issue 16's pricing terms: long-context tiers, cache writes, audio, service tiers,
request fees, effective-dated versions, and the single rounding at the end."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.billing.pricing import price
from proxy.config import PriceRule, parse_price_rules
from proxy.contract.usage import Usage
from proxy.errors import ConfigError

M = 1_000_000


def rule(**prices: Any) -> PriceRule:
    return parse_price_rules({"r": {"input": 2, "output": 8, **prices}})["r"]


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).astimezone(UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    ("prices", "usage", "kwargs", "credits"),
    [
        # -- cache writes: part of the prompt, at cache_write (default: input)
        ({"cache_write": 2.5}, Usage(prompt_tokens=M, cache_write_tokens=M), {}, 3),  # 2.5 -> 3
        ({}, Usage(prompt_tokens=M, cache_write_tokens=M), {}, 2),
        # 400k text*2 + 200k cached*1 + 400k write*2.5 = 0.8 + 0.2 + 1.0 = 2.0
        (
            {"cached_input": 1, "cache_write": 2.5},
            Usage(prompt_tokens=M, cached_tokens=200_000, cache_write_tokens=400_000),
            {},
            2,
        ),
        # -- audio: parts of prompt and completion at their own rates
        # 500k text in*2 + 500k audio in*40 = 1 + 20 = 21
        (
            {"audio_input": 40, "audio_output": 80},
            Usage(prompt_tokens=M, audio_prompt_tokens=500_000),
            {},
            21,
        ),
        # 250k audio out*80 + 750k text out*8 = 20 + 6 = 26
        (
            {"audio_input": 40, "audio_output": 80},
            Usage(completion_tokens=M, audio_completion_tokens=250_000),
            {},
            26,
        ),
        # a rule without audio rates prices audio at the text rates
        (
            {},
            Usage(
                prompt_tokens=M,
                audio_prompt_tokens=M,
                completion_tokens=M,
                audio_completion_tokens=M,
            ),
            {},
            10,
        ),
        # -- long-context tiers: all-or-nothing by prompt size
        (
            {"tiers": [{"above_prompt_tokens": M, "input": 4, "output": 16}]},
            Usage(prompt_tokens=M, completion_tokens=M),
            {},
            10,
        ),
        (
            {"tiers": [{"above_prompt_tokens": M, "input": 4, "output": 16}]},
            Usage(prompt_tokens=M + 1, completion_tokens=M),
            {},
            21,
        ),  # 4.000004+16 -> 21
        (
            {
                "tiers": [
                    {"above_prompt_tokens": 100, "input": 3, "output": 9},
                    {"above_prompt_tokens": 200, "input": 5, "output": 11},
                ]
            },
            Usage(prompt_tokens=201),  # the highest tier exceeded: 201*5 = 0.001005 -> 1
            {},
            1,
        ),
        (
            {"tiers": [{"above_prompt_tokens": 100, "input": 3, "output": 9, "cached_input": 1}]},
            Usage(prompt_tokens=2 * M, cached_tokens=M),  # M*3 + M*1 = 4 (tier's cached rate)
            {},
            4,
        ),
        # -- service tiers
        (
            {"service_tiers": {"priority": {"multiplier": 2}}},
            Usage(prompt_tokens=M, completion_tokens=M),
            {"service_tier": "priority"},
            20,
        ),
        (
            {"service_tiers": {"priority": {"multiplier": 2}}},
            Usage(prompt_tokens=M, completion_tokens=M),
            {"service_tier": "default"},
            10,
        ),
        (
            {"service_tiers": {"priority": {"multiplier": 2}}},
            Usage(prompt_tokens=M, completion_tokens=M),
            {},
            10,
        ),
        (
            {"service_tiers": {"flex": {"input": 1, "output": 4}}},
            Usage(prompt_tokens=M, completion_tokens=M),
            {"service_tier": "flex"},
            5,
        ),
        # the rule's multiplier and the tier's multiply: 10 * 0.5 * 3 = 15
        (
            {"multiplier": 0.5, "service_tiers": {"p": {"multiplier": 3}}},
            Usage(prompt_tokens=M, completion_tokens=M),
            {"service_tier": "p"},
            15,
        ),
        # -- request fee: added before the one rounding, not multiplied
        ({"request_fee": 0.4}, Usage(prompt_tokens=300_000), {}, 1),  # 0.6 + 0.4 = 1.0 exactly
        ({"request_fee": 0.4}, Usage(prompt_tokens=300_001), {}, 2),
        ({"request_fee": 25, "multiplier": 2}, Usage(prompt_tokens=M), {}, 29),  # 2*2 + 25
        ({"request_fee": 25}, Usage(), {}, 0),  # nothing used, nothing owed
        # -- rounding happens once: 3 parts of 0.4 each = 1.2 -> 2 (not 1+1+1 = 3)
        (
            {"input": 1, "cache_write": 1, "audio_input": 1},
            Usage(prompt_tokens=1_200_000, cache_write_tokens=400_000, audio_prompt_tokens=400_000),
            {},
            2,
        ),
    ],
)
def test_price_book_table(
    prices: dict[str, Any], usage: Usage, kwargs: dict[str, Any], credits: int
) -> None:
    assert price(rule(**prices), usage, **kwargs).credits == credits


VERSIONED = {
    "input": 2,
    "output": 8,
    "versions": [
        {"effective_from": "2027-01-01T00:00:00Z", "input": 1, "output": 4},
        {"effective_from": "2027-06-01T00:00:00+02:00", "input": 3, "output": 12},
    ],
}


@pytest.mark.parametrize(
    ("started", "version", "credits"),
    [
        ("2026-12-31T23:59:59.999Z", None, 10),
        ("2027-01-01T00:00:00.000Z", "2027-01-01T00:00:00Z", 5),
        ("2027-05-31T21:59:59.999Z", "2027-01-01T00:00:00Z", 5),
        ("2027-05-31T22:00:00.000Z", "2027-05-31T22:00:00Z", 15),  # +02:00 read as UTC
        ("2099-01-01T00:00:00.000Z", "2027-05-31T22:00:00Z", 15),
    ],
)
def test_the_version_in_force_at_request_start_prices_it(
    started: str, version: str | None, credits: int
) -> None:
    r = parse_price_rules({"v": VERSIONED})["v"]
    charge = price(r, Usage(prompt_tokens=M, completion_tokens=M), started_ms=ms(started))
    assert (charge.rule_version, charge.credits) == (version, credits)


def test_a_version_is_complete_on_its_own() -> None:
    r = parse_price_rules(
        {"v": {**VERSIONED, "request_fee": 7, "service_tiers": {"priority": {"multiplier": 2}}}}
    )["v"]
    later = r.in_force(ms("2027-02-01T00:00:00Z"))
    assert (later.request_fee, dict(later.service_tiers)) == (0, {})
    assert r.version("2027-01-01T00:00:00Z") is later
    assert r.version("2030-01-01T00:00:00Z") is None


def test_unpriced_service_tier_is_an_error_not_a_plain_rate() -> None:
    with pytest.raises(ValueError, match="service_tier 'priority' is not priced"):
        price(rule(), Usage(prompt_tokens=1), service_tier="priority")


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        (Usage(prompt_tokens=5, cached_tokens=3, cache_write_tokens=3), "exceed prompt_tokens"),
        (Usage(prompt_tokens=5, audio_prompt_tokens=6), "exceed prompt_tokens"),
        (Usage(completion_tokens=5, reasoning_tokens=3, audio_completion_tokens=3), "exceed"),
        (Usage(prompt_tokens=5, cache_write_tokens=-1), "cache_write_tokens must not be negative"),
    ],
)
def test_impossible_parts_are_rejected(usage: Usage, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        price(rule(), usage)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tiers": [{"input": 1, "output": 1}]}, "r.tiers[0].above_prompt_tokens: required"),
        (
            {
                "tiers": [
                    {"above_prompt_tokens": 10, "input": 1, "output": 1},
                    {"above_prompt_tokens": 10, "input": 1, "output": 1},
                ]
            },
            "r.tiers[1].above_prompt_tokens: tiers must be in ascending order",
        ),
        ({"tiers": [{"above_prompt_tokens": 10, "input": 1}]}, "r.tiers[0].output: required"),
        (
            {"tiers": [{"above_prompt_tokens": 10, "input": 1, "output": 1, "x": 1}]},
            "r.tiers[0].x: unknown key",
        ),
        (
            {"service_tiers": {"priority": {}}},
            "r.service_tiers.priority: give a multiplier or rates",
        ),
        (
            {"service_tiers": {"priority": {"input": 3}}},
            "r.service_tiers.priority.output: required",
        ),
        ({"service_tiers": {"priority": {"cached_input": 3}}}, "rates need both input and output"),
        (
            {"service_tiers": {"priority": {"multiplier": -1}}},
            "r.service_tiers.priority.multiplier: must be",
        ),
        ({"service_tiers": {"priority": None}}, "r.service_tiers.priority: required section"),
        ({"request_fee": -1}, "r.request_fee: must be a non-negative number"),
        ({"cache_write": "x"}, "r.cache_write: must be a non-negative number"),
        ({"versions": [{"input": 1, "output": 1}]}, "r.versions[0].effective_from: required"),
        (
            {"versions": [{"effective_from": "2027-01-01T00:00:00", "input": 1, "output": 1}]},
            "r.versions[0].effective_from: must be an ISO-8601 time with a zone",
        ),
        (
            {"versions": [{"effective_from": "soon", "input": 1, "output": 1}]},
            "r.versions[0].effective_from: must be an ISO-8601 time with a zone",
        ),
        (
            {
                "versions": [
                    {"effective_from": "2027-02-01T00:00:00Z", "input": 1, "output": 1},
                    {"effective_from": "2027-01-01T00:00:00Z", "input": 1, "output": 1},
                ]
            },
            "r.versions[1].effective_from: versions must be in ascending effective_from order",
        ),
        (
            {"versions": [{"effective_from": "2027-01-01T00:00:00Z", "input": 1}]},
            "r.versions[0].output: required",
        ),
        (
            {
                "versions": [
                    {
                        "effective_from": "2027-01-01T00:00:00Z",
                        "input": 1,
                        "output": 1,
                        "versions": [],
                    }
                ]
            },
            "r.versions[0].versions: unknown key",
        ),
    ],
)
def test_price_book_errors_name_the_key_path(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_price_rules({"r": {"input": 2, "output": 8, **raw}}, path="r")
    assert message in str(info.value).replace("r.r.", "r.")


def test_unquoted_yaml_timestamps_are_read_too() -> None:
    from proxy.config.yaml_loader import load_yaml

    raw = load_yaml(
        "v:\n  input: 1\n  output: 1\n  versions:\n"
        "    - {effective_from: 2027-01-01T00:00:00Z, input: 2, output: 2}\n"
    )
    r = parse_price_rules(raw)["v"]
    assert r.schedules[1].effective_from == "2027-01-01T00:00:00Z"


# An independent reference (exact rationals) for the full formula, over random inputs.
_rate = st.decimals(min_value=0, max_value=500, places=3, allow_nan=False, allow_infinity=False)
_n = st.integers(min_value=0, max_value=10**9)


@given(
    rates=st.lists(_rate, min_size=7, max_size=7),
    mult=_rate,
    tier_mult=_rate,
    fee=_rate,
    min_charge=st.integers(0, 20),
    parts=st.lists(_n, min_size=7, max_size=7),
    above=st.integers(1, 5 * 10**9),
)
def test_price_book_matches_rational_reference(
    rates: list[Any],
    mult: Any,
    tier_mult: Any,
    fee: Any,
    min_charge: int,
    parts: list[int],
    above: int,
) -> None:
    names = (
        "input",
        "cached_input",
        "cache_write",
        "audio_input",
        "output",
        "reasoning",
        "audio_output",
    )
    text_in, cached, write, audio_in, text_out, reasoning, audio_out = parts
    prompt = text_in + cached + write + audio_in
    tier_rates = {k: v * 2 for k, v in zip(names, rates, strict=True)}
    r = parse_price_rules(
        {
            "r": {
                **dict(zip(names, rates, strict=True)),
                "multiplier": mult,
                "request_fee": fee,
                "min_charge": min_charge,
                "tiers": [{"above_prompt_tokens": above, **tier_rates}],
                "service_tiers": {"p": {"multiplier": tier_mult}},
            }
        }
    )["r"]
    usage = Usage(
        prompt_tokens=prompt,
        cached_tokens=cached,
        cache_write_tokens=write,
        audio_prompt_tokens=audio_in,
        completion_tokens=text_out + reasoning + audio_out,
        reasoning_tokens=reasoning,
        audio_completion_tokens=audio_out,
    )
    used = dict(zip(names, (Fraction(x) for x in rates), strict=True))
    if prompt > above:
        used = {k: Fraction(v) for k, v in tier_rates.items()}
    raw = sum(n * used[k] for n, k in zip(parts, names, strict=True)) / M * Fraction(
        mult
    ) * Fraction(tier_mult) + Fraction(fee)
    expected = 0 if sum(parts) == 0 else max(math.ceil(raw), min_charge)
    assert price(r, usage, service_tier="p").credits == expected
