"""Issue 16 through the real proxy (fake upstream, events in the sink): price-changing
fields priced or refused, the price version and tier in the event, cache writes and
audio charged, long-context tiers, and cost in band."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import orjson
import pytest

from proxy.devtools.fake_upstream import Behaviour
from tests.fixtures_proxy import ProxyHarness, StartProxy

MESSAGES = [{"role": "user", "content": "What do figs cost?"}]
REQ = {"model": "smart", "messages": MESSAGES}

RULES = """\
  book:
    input: 1000
    output: 2000
    request_fee: 0.5
    versions:
      - effective_from: "2020-01-01T00:00:00Z"
        input: 3000
        output: 4000
        cached_input: 1000
        cache_write: 5000
        audio_input: 20000
        audio_output: 40000
        request_fee: 0.25
        service_tiers:
          priority: {multiplier: 2}
          flex: {input: 1500, output: 2000, audio_input: 10000, audio_output: 20000}
      - effective_from: "2999-01-01T00:00:00Z"
        input: 1
        output: 1
  long: {input: 1000, output: 1000, tiers: [{above_prompt_tokens: 30, input: 100000, output: 1000}]}
"""
ALIASES = """\
  booked: {provider: fake, model: fake-model-book, price_rule: book,
           allow_params: [service_tier, audio, web_search_options, route]}
  long: {provider: fake, model: fake-model-long, price_rule: long}
  told: {provider: fake, model: fake-model-told, price_rule: std, cost_in_band: true}
"""


async def booked(start_proxy: StartProxy, **behaviour: Any) -> ProxyHarness:
    return await start_proxy(
        behaviour=Behaviour(**behaviour), extra_rules=RULES, extra_aliases=ALIASES
    )


async def one_event(h: ProxyHarness) -> dict[str, Any]:
    await h.flush_events()
    (event,) = h.sink_events()
    return event


def credits(parts: dict[str, tuple[int, int]], multiplier: Fraction, fee: Fraction) -> int:
    """An independent ceil(sum(count * rate) / 1M * multiplier + fee)."""
    raw = sum(Fraction(n * rate) for n, rate in parts.values()) / 1_000_000 * multiplier + fee
    return math.ceil(raw)


# -- refused before the call ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"service_tier": "priority"}, "service_tier"),
        ({"service_tier": "auto"}, "service_tier"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"models": ["other/expensive-model"]}, "models"),  # a gateway's routing field
        ({"provider": {"order": ["x"]}}, "provider"),
    ],
)
async def test_unpriced_price_changing_fields_are_400_naming_the_field(
    start_proxy: StartProxy, extra: dict[str, Any], param: str
) -> None:
    h = await booked(start_proxy)
    for stream in (False, True):
        status, body, _ = await h.chat({**REQ, **extra, "stream": stream})
        assert status == 400, body
        assert (body["error"]["code"], body["error"]["param"]) == ("unsupported_parameter", param)
        assert param in body["error"]["message"] and "smart" in body["error"]["message"]
    assert h.recorder.requests == []
    await h.flush_events()
    assert h.sink_events() == []


@pytest.mark.parametrize(
    "extra",
    [
        {"service_tier": "default"},
        {"service_tier": None},
        {"modalities": ["text"]},
        {"audio": None},
        {"temperature": 0.2, "seed": 1, "tools": None, "metadata": {"a": "b"}},
    ],
)
async def test_plain_values_need_no_permission(
    start_proxy: StartProxy, extra: dict[str, Any]
) -> None:
    h = await booked(start_proxy)
    status, _, _ = await h.chat({**REQ, **extra})
    assert status == 200
    assert (await one_event(h))["service_tier"] == extra.get("service_tier")


async def test_a_tier_the_rule_does_not_price_is_400(start_proxy: StartProxy) -> None:
    h = await booked(start_proxy)
    status, body, _ = await h.chat({**REQ, "model": "booked", "service_tier": "scale"})
    assert (status, body["error"]["param"]) == (400, "service_tier")
    assert "priced: default, flex, priority" in body["error"]["message"]
    assert h.recorder.requests == []


# -- priced: the version in force, the tier, cache writes, audio, the fee ---------------------


async def test_priority_tier_with_cache_writes_is_priced_by_the_version_in_force(
    start_proxy: StartProxy,
) -> None:
    h = await booked(start_proxy, cached_tokens=4, cache_write_tokens=6)
    status, body, _ = await h.chat({**REQ, "model": "booked", "service_tier": "priority"})
    assert status == 200
    assert h.recorder.requests[0]["body"]["service_tier"] == "priority"  # relayed as asked
    u = body["usage"]
    event = await one_event(h)
    assert (event["price_rule"], event["price_version"]) == ("book", "2020-01-01T00:00:00Z")
    assert event["service_tier"] == "priority"
    assert event["usage"]["cached"] == 4 and event["usage"]["cache_write"] == 6
    assert event["started_at"] <= event["occurred_at"]
    text_in = u["prompt_tokens"] - 4 - 6
    expected = credits(
        {
            "in": (text_in, 3000),
            "cached": (4, 1000),
            "write": (6, 5000),
            "out": (u["completion_tokens"], 4000),
        },
        Fraction(2),
        Fraction(1, 4),
    )
    assert event["credits"] == expected


@pytest.mark.parametrize("stream", [False, True])
async def test_audio_is_priced_at_the_audio_rates_of_the_tier(
    start_proxy: StartProxy, stream: bool
) -> None:
    h = await booked(start_proxy, audio_prompt_tokens=700, audio_completion_tokens=300)
    body = {
        **REQ,
        "model": "booked",
        "service_tier": "flex",
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "pcm16"},
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    status, _, _ = await h.chat(body)
    assert status == 200
    event = await one_event(h)
    u = event["usage"]
    assert (u["audio_prompt"], u["audio_completion"], event["usage_source"]) == (
        700,
        300,
        "upstream",
    )
    expected = credits(
        {
            "in": (u["prompt"] - 700, 1500),
            "audio_in": (700, 10000),
            "out": (u["completion"] - 300, 2000),
            "audio_out": (300, 20000),
        },
        Fraction(1),
        Fraction(1, 4),
    )
    assert event["credits"] == expected


async def test_long_prompts_pay_the_long_context_rate_for_all_tokens(
    start_proxy: StartProxy,
) -> None:
    h = await booked(start_proxy)
    short = {**REQ, "model": "long"}
    long = {**short, "messages": [{"role": "user", "content": "figs " * 40}]}
    for body in (short, long):
        assert (await h.chat(body))[0] == 200
    await h.flush_events()
    cheap, dear = h.sink_events()
    assert cheap["usage"]["prompt"] <= 30 < dear["usage"]["prompt"]
    assert cheap["credits"] == math.ceil(
        Fraction(cheap["usage"]["prompt"] * 1000 + cheap["usage"]["completion"] * 1000, 10**6)
    )
    assert dear["credits"] == math.ceil(
        Fraction(dear["usage"]["prompt"] * 100000 + dear["usage"]["completion"] * 1000, 10**6)
    )


# -- cost in band ------------------------------------------------------------------------------


async def test_cost_in_band_non_streamed(start_proxy: StartProxy) -> None:
    h = await booked(start_proxy)
    status, body, headers = await h.chat({**REQ, "model": "told"})
    assert status == 200
    event = await one_event(h)
    assert body["usage"]["cost"] == event["credits"] > 0
    assert headers["X-Credits-Charged"] == str(event["credits"])


async def test_cost_in_band_stream_when_usage_asked(start_proxy: StartProxy) -> None:
    h = await booked(start_proxy)
    body = {**REQ, "model": "told", "stream": True, "stream_options": {"include_usage": True}}
    status, raw, headers = await h.chat(body)
    assert status == 200 and "X-Credits-Charged" not in headers
    usage_events = [
        orjson.loads(e[6:])
        for e in raw.split(b"\n\n")
        if e.startswith(b"data: {") and b'"usage":{' in e
    ]
    event = await one_event(h)
    assert usage_events[-1]["usage"]["cost"] == event["credits"] > 0
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_cost_in_band_is_off_by_default_and_without_usage(start_proxy: StartProxy) -> None:
    h = await booked(start_proxy)
    status, body, headers = await h.chat(REQ)  # smart: no cost_in_band
    assert status == 200 and "cost" not in body["usage"] and "X-Credits-Charged" not in headers
    # A told stream without include_usage: the caller sees no usage, so no cost either.
    status, raw, _ = await h.chat({**REQ, "model": "told", "stream": True})
    assert status == 200 and b'"usage"' not in raw and b'"cost"' not in raw


async def test_cost_in_band_says_zero_when_nothing_is_charged(start_proxy: StartProxy) -> None:
    h = await booked(start_proxy)
    status, body, headers = await h.chat(
        {**REQ, "model": "told"}, h.headers(**{"X-Skip-Charge": "true"})
    )
    assert status == 200
    assert (body["usage"]["cost"], headers["X-Credits-Charged"]) == (0, "0")
    await h.flush_events()
    assert h.sink_events() == []
