"""The usage normaliser: what a report may say, and what makes it implausible."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
import tiktoken

from proxy.billing.encodings import EncodingRegistry
from proxy.billing.metering import MeterFlag, Reply, estimate, estimate_off_loop, meter_json
from proxy.billing.pricing import price
from proxy.billing.usage_report import find_report, normalise
from proxy.config.load import parse_price_rules
from proxy.contract.charge_event import MAX_CREDITS, MAX_TOKENS
from proxy.contract.usage import Usage, UsageSource

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
OK = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return EncodingRegistry().get("o200k_base")


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({}, Usage(10, 5)),
        ({"completion_tokens": 4.2}, Usage(10, 5)),  # floats round up, never down
        ({"prompt_tokens": 0.1, "completion_tokens": 0.1, "total_tokens": None}, Usage(1, 1)),
        ({"total_tokens": 40}, Usage(10, 30, 0, 25)),  # Gemini: thinking only in total
        ({"total_tokens": 3}, Usage(10, 5)),  # a short total is ignored
        ({"completion_tokens": None, "total_tokens": 12}, Usage(10, 2)),
        ({"prompt_tokens_details": {"cached_tokens": 99}}, Usage(10, 5, 10, 0)),  # clamped
        ({"prompt_cache_hit_tokens": 4}, Usage(10, 5, 4, 0)),  # DeepSeek
        ({"cached_tokens": 3}, Usage(10, 5, 3, 0)),  # Moonshot
        ({"completion_tokens_details": {"reasoning_tokens": 2}}, Usage(10, 5, 0, 2)),
        ({"completion_tokens_details": None, "prompt_tokens_details": None}, Usage(10, 5)),
    ],
)
def test_plausible_reports(patch: dict[str, Any], expected: Usage) -> None:
    assert normalise({**OK, **patch}) == expected


@pytest.mark.parametrize(
    "raw",
    [
        {},
        [],
        "10",
        True,
        17,
        {"completion_tokens": 5},  # no prompt
        {**OK, "prompt_tokens": 0},  # every request has a prompt
        {**OK, "prompt_tokens": "10"},
        {**OK, "completion_tokens": "5"},
        {**OK, "completion_tokens": True},
        {**OK, "prompt_tokens": False},
        {**OK, "completion_tokens": {}},
        {**OK, "completion_tokens": [5]},
        {**OK, "completion_tokens": -1},
        {**OK, "completion_tokens": -0.5},
        {**OK, "completion_tokens": math.nan},
        {**OK, "completion_tokens": math.inf},
        {**OK, "completion_tokens": MAX_TOKENS + 1},
        {**OK, "prompt_tokens": 2**64},
        {**OK, "total_tokens": 10**30},
        {**OK, "prompt_tokens_details": {"cached_tokens": "3"}},
        {**OK, "completion_tokens_details": {"reasoning_tokens": -2}},
        {"prompt_tokens": 10, "completion_tokens": None},  # nothing says the completion
    ],
)
def test_implausible_reports(raw: Any) -> None:
    assert normalise(raw) is None


def test_locations_in_table_order() -> None:
    assert find_report({"choices": []}) is None
    assert find_report({"usage": None}) is None
    groq = find_report({"usage": None, "x_groq": {"usage": OK}})
    assert groq is not None and groq.where == "groq" and groq.usage == Usage(10, 5)
    both = find_report({"usage": {**OK, "prompt_tokens": 20}, "x_groq": {"usage": OK}})
    assert both is not None and both.where == "openai" and both.usage == Usage(20, 5)
    moon = find_report({"choices": {"index": 0, "usage": OK}})  # non-list choices too
    assert moon is not None and moon.where == "moonshot"
    bad = find_report({"usage": "lots"})
    assert bad is not None and not bad.valid


@pytest.mark.parametrize(
    "usage",
    [
        b"{}",
        b'{"prompt_tokens":"9","completion_tokens":4}',
        b'{"prompt_tokens":9,"completion_tokens":100000000000000000000000000000000000000}',
        b'{"prompt_tokens":9,"completion_tokens":-4}',
        b'"lots"',
    ],
)
def test_an_implausible_report_is_replaced_by_the_estimate(
    enc: tiktoken.Encoding, usage: bytes
) -> None:
    body = b'{"choices":[{"message":{"content":"four words right here"}}],"usage":' + usage + b"}"
    metered = meter_json(body, REQUEST, enc)
    assert metered.source is UsageSource.ESTIMATED
    assert MeterFlag.REPORT_REJECTED in metered.flags
    assert metered.usage.completion_tokens == 4


def test_a_report_of_no_completion_for_relayed_text_is_rejected(enc: tiktoken.Encoding) -> None:
    body = orjson.dumps(
        {
            "choices": [{"message": {"content": "four words right here"}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 0},
        }
    )
    metered = meter_json(body, REQUEST, enc)
    assert metered.source is UsageSource.ESTIMATED
    assert metered.usage.completion_tokens == 4


def test_credits_are_capped_so_every_ledger_can_apply_them() -> None:
    rule = parse_price_rules({"huge": {"input": 10**15, "output": 10**15}})["huge"]
    charge = price(rule, Usage(MAX_TOKENS, MAX_TOKENS))
    assert charge.credits == MAX_CREDITS < 2**53


async def test_large_inputs_are_bounded_at_once_and_counted_off_the_loop(
    enc: tiktoken.Encoding,
) -> None:
    text = "the quick brown fox jumps over the lazy dog " * 5000  # 220 KB
    body = {"messages": [{"role": "user", "content": text}]}
    bound = estimate(body, Reply("a reply"), enc)
    assert MeterFlag.BOUNDED in bound.flags
    assert bound.usage.prompt_tokens >= len(text)  # bytes: an upper bound
    exact = await estimate_off_loop(bound, body, Reply("a reply"), enc)
    assert not exact.flags
    assert exact.usage.prompt_tokens == 3 + 1 + len(enc.encode_ordinary(text)) + 3
    assert exact.usage.completion_tokens == 2


async def test_a_tokenizer_panic_off_the_loop_keeps_the_byte_bound(enc: tiktoken.Encoding) -> None:
    body = {"messages": [{"role": "user", "content": " \t" * 500_000}]}
    bound = estimate(body, Reply(), enc)
    counted = await estimate_off_loop(bound, body, Reply(), enc)
    assert counted.flags == {MeterFlag.COUNT_FAILED}
    assert counted.usage.prompt_tokens >= 1_000_000
