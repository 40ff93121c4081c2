"""The admission estimate and the reserve/settle arithmetic, as invariants."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.billing.books_guard import BooksGuard
from proxy.billing.counting import TokenCounter
from proxy.billing.estimate import (
    clamped_output,
    estimate_request,
    output_limit,
    with_output_limit,
)
from proxy.billing.hold import Hold, Reserved
from proxy.billing.pricing import (
    _upper_bound_decimal,
    affordable_output,
    price,
    rates_for,
    upper_bound,
)
from proxy.billing.record import ChatRequest
from proxy.billing.tokens import count_chat_prompt
from proxy.config import PriceRule, parse_price_rules
from proxy.config.model import Alias, GuardConfig, Provider
from proxy.contract.usage import Usage

PROVIDER = Provider(name="acme", base_url="http://u/v1", api_key_env=None, api_key=None)
RULES = parse_price_rules(
    {
        "plain": {"input": 2.5, "output": 10},
        "dear": {"input": 10_000_000, "output": 20_000_000},  # 10 / 20 credits a token
        "rich": {
            "input": 3,
            "cached_input": 1,
            "output": 12,
            "reasoning": 20,
            "cache_write": 4,
            "audio_input": 40,
            "audio_output": 80,
            "multiplier": 1.5,
            "min_charge": 2,
            "request_fee": 0.25,
            "tiers": [{"above_prompt_tokens": 1000, "input": 6, "output": 24}],
        },
    }
)


def alias(rule: PriceRule | None = RULES["plain"], **kw: Any) -> Alias:
    return Alias(name="a", provider=PROVIDER, model="m", price_rule=rule, **kw)


def chat(body: dict[str, Any], a: Alias | None = None) -> ChatRequest:
    return ChatRequest(alias=a or alias(), body=body, stream=False, usage_requested=False)


MSG = [{"role": "user", "content": "hello there, what is a fig?"}]


def test_output_allowance_is_the_requests_limit_else_the_aliases() -> None:
    a = alias(reserve_output_tokens=300)
    assert estimate_request(chat({"messages": MSG}, a)).output_tokens == 300
    assert estimate_request(chat({"messages": MSG, "max_tokens": 50}, a)).output_tokens == 50
    both = {"messages": MSG, "max_tokens": 50, "max_completion_tokens": 70}
    assert estimate_request(chat(both, a)).output_tokens == 70
    assert (
        estimate_request(chat({"messages": MSG, "max_tokens": 50, "n": 3}, a)).output_tokens == 150
    )
    fields = ("max_tokens",)
    assert output_limit({"max_tokens": True}, fields) is None
    assert output_limit({"max_tokens": 0}, fields) is None


def test_each_endpoint_has_its_prompt_bound_and_output_limit() -> None:
    from dataclasses import replace

    from proxy.billing.wire_formats import COMPLETIONS, EMBEDDINGS, RESPONSES

    a = alias(reserve_output_tokens=300)
    text = "y" * 90
    emb = replace(chat({"input": [text, text]}, a), format=EMBEDDINGS)
    est = estimate_request(emb)
    assert est.prompt_tokens >= 180 and est.output_tokens == 0  # embeddings: no output
    assert with_output_limit(emb, 5) is emb
    resp = replace(chat({"input": text, "max_output_tokens": 40}, a), format=RESPONSES)
    est = estimate_request(resp)
    assert est.prompt_tokens >= 90 and est.output_tokens == 40
    clamped = with_output_limit(resp, 10)
    assert clamped.body["max_output_tokens"] == 10 and clamped.format is RESPONSES
    comp = replace(chat({"prompt": text}, a), format=COMPLETIONS)
    assert estimate_request(comp).output_tokens == 300
    assert with_output_limit(comp, 12).body["max_tokens"] == 12


def test_prompt_bound_is_bytes_not_tokens() -> None:
    est = estimate_request(chat({"messages": MSG}))
    assert est.prompt_tokens == count_chat_prompt(TokenCounter(None), {"messages": MSG})
    assert est.prompt_tokens >= len("hello there, what is a fig?")


def test_free_alias_costs_nothing() -> None:
    assert estimate_request(chat({"messages": MSG}, alias(None))).credits == 0


@settings(max_examples=300, deadline=None)
@given(
    rule_id=st.sampled_from(sorted(RULES)),
    prompt=st.integers(0, 10**9),
    output=st.integers(0, 10**9),
    started_ms=st.sampled_from([0, 1, 10**12, 2**62]),
)
def test_upper_bound_in_integers_is_the_decimal_formula(
    rule_id: str, prompt: int, output: int, started_ms: int
) -> None:
    rule = RULES[rule_id]
    schedule = rule.in_force(started_ms)
    rates, multiplier = rates_for(schedule, prompt, None)
    expected = (
        0
        if prompt + output == 0
        else _upper_bound_decimal(schedule, rates, multiplier, prompt, output)
    )
    assert upper_bound(rule, prompt, output, started_ms=started_ms) == expected


@settings(max_examples=300, deadline=None)
@given(
    rule_id=st.sampled_from(sorted(RULES)),
    prompt=st.integers(0, 5000),
    output=st.integers(0, 5000),
    data=st.data(),
)
def test_upper_bound_covers_any_usage_within_the_counts(
    rule_id: str, prompt: int, output: int, data: st.DataObject
) -> None:
    """Whatever the provider reports within the bounds (any split into cached, cache
    write, audio, reasoning), the charge never exceeds the estimate."""
    rule = RULES[rule_id]
    p = data.draw(st.integers(0, prompt))
    c = data.draw(st.integers(0, output))
    cached = data.draw(st.integers(0, p))
    write = data.draw(st.integers(0, p - cached))
    audio_in = data.draw(st.integers(0, p - cached - write))
    reasoning = data.draw(st.integers(0, c))
    audio_out = data.draw(st.integers(0, c - reasoning))
    usage = Usage(
        prompt_tokens=p,
        completion_tokens=c,
        cached_tokens=cached,
        cache_write_tokens=write,
        audio_prompt_tokens=audio_in,
        reasoning_tokens=reasoning,
        audio_completion_tokens=audio_out,
    )
    assert price(rule, usage).credits <= upper_bound(rule, prompt, output)


@settings(max_examples=300, deadline=None)
@given(
    rule_id=st.sampled_from(sorted(RULES)),
    prompt=st.integers(0, 3000),
    credits=st.integers(0, 100_000),
)
def test_affordable_output_is_the_most_that_fits(rule_id: str, prompt: int, credits: int) -> None:
    rule = RULES[rule_id]
    tokens = affordable_output(rule, prompt, credits)
    assert tokens is not None
    if tokens > 0:
        assert upper_bound(rule, prompt, tokens) <= credits
    assert upper_bound(rule, prompt, tokens + 1) > credits or upper_bound(rule, prompt, 0) == 0


def test_clamp_rewrites_the_field_the_caller_used() -> None:
    a = alias(RULES["dear"])
    c = chat({"messages": MSG, "max_tokens": 1000}, a)
    est = estimate_request(c)
    room = upper_bound(a.price_rule, est.prompt_tokens, 40) + 19  # not quite 41
    assert clamped_output(c, est, room, started_ms=0) == 40
    assert with_output_limit(c, 40).body["max_tokens"] == 40
    fresh = with_output_limit(chat({"messages": MSG}, a), 7).body
    assert fresh["max_completion_tokens"] == 7 and "max_tokens" not in fresh


# -- reserve/settle arithmetic (the in-process holds of BooksGuard) ------------------------


@dataclass
class View:
    balance: int
    is_blocked: bool = False


class Books:
    def __init__(self, balance: int) -> None:
        self.balance = balance

    async def fetch(self, user_id: int) -> View:
        await asyncio.sleep(0)  # a real await: other reservations interleave
        return View(self.balance)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


steps = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "settle", "apply", "tick"]),
        st.integers(1, 500),  # estimate
        st.integers(0, 500),  # actual charge
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(balance=st.integers(0, 3000), program=steps)
def test_holds_never_let_admitted_estimates_exceed_the_credit(
    balance: int, program: list[tuple[str, int, int]]
) -> None:
    """Any interleaving of concurrent reservations, settlements (actual <= estimate),
    ledger applications and expiry: at every moment the live holds plus what the
    ledger debited never exceed the credit granted, and nothing is held twice."""

    async def run() -> None:
        books, clock = Books(balance), Clock()
        guard = BooksGuard(books, GuardConfig(hold_ttl_s=10, budget_ms=1000), clock=clock)
        open_: list[tuple[Hold, int]] = []  # admitted, not settled
        settled: list[tuple[Hold, int]] = []  # settled, not applied
        n = 0
        for op, estimate, actual in program:
            if op == "reserve":
                batch = []
                for _ in range(3):  # three at once
                    n += 1
                    batch.append(Hold(1, f"r{n}"))
                results = await asyncio.gather(*(guard.reserve(h, estimate, 0) for h in batch))
                for h, r in zip(batch, results, strict=True):
                    assert r.result in (Reserved.ADMITTED, Reserved.REFUSED)
                    if r.result is Reserved.ADMITTED:
                        open_.append((h, estimate))
            elif op == "settle" and open_:
                h, est = open_.pop(0)
                charge = min(actual, est)
                guard.settle(h, charge)
                if charge and guard.held(1) >= 0:
                    settled.append((h, charge))
            elif op == "apply" and settled:
                h, charge = settled.pop(0)
                books.balance -= charge
                guard.release_applied({1: [h.request_id]})
            elif op == "tick":
                clock.now += estimate / 50  # sometimes past hold_ttl_s
            assert guard.held(1) >= 0
            if clock.now < 10:  # before any hold could expire
                assert guard.held(1) <= books.balance or books.balance < 0
                assert books.balance >= 0

    asyncio.run(run())


async def test_the_same_request_id_cannot_hold_twice() -> None:
    guard = BooksGuard(Books(10_000), GuardConfig())
    assert (await guard.reserve(Hold(1, "x"), 10, 0)).result is Reserved.ADMITTED
    assert (await guard.reserve(Hold(1, "x"), 10, 0)).result is Reserved.CONFLICT
    assert (await guard.reserve(Hold(2, "x"), 10, 0)).result is Reserved.ADMITTED


async def test_clamp_holds_the_rest_when_at_least_the_floor_fits() -> None:
    guard = BooksGuard(Books(100), GuardConfig())
    r = await guard.reserve(Hold(1, "a"), 150, 20)
    assert (r.result, r.held) == (Reserved.CLAMPED, 100)
    assert (await guard.reserve(Hold(1, "b"), 150, 20)).result is Reserved.REFUSED


@pytest.mark.parametrize("credits", [0, 7])
async def test_settle_releases_zero_and_keeps_the_charge(credits: int) -> None:
    guard = BooksGuard(Books(100), GuardConfig())
    h = Hold(1, "a")
    await guard.reserve(h, 50, 0)
    guard.settle(h, credits)
    assert guard.held(1) == credits
