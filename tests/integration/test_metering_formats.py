"""Metering against the fake upstream: every provider dialect, usage faults, a
pathological prompt, and the client-disconnect policy (issue 15)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.billing.encodings import EncodingRegistry
from proxy.billing.tokens import count_chat_prompt, count_text
from proxy.devtools.fake_upstream import Behaviour, reply_words
from proxy.devtools.provider_formats import FORMATS
from tests.fixtures_proxy import ProxyHarness, StartProxy

REQ = {"model": "smart", "messages": [{"role": "user", "content": "Count the figs."}]}
CACHED, REASONING = 2, 40


def truth(body: dict[str, Any], chunks: int = 8) -> tuple[int, int]:
    """(prompt, completion) the fake counts for `body`, thinking included."""
    enc = EncodingRegistry().get("o200k_base")
    text = " ".join(reply_words(body, chunks))
    return count_chat_prompt(enc, body), count_text(enc, text) + REASONING


async def one_event(h: ProxyHarness) -> dict[str, Any]:
    events = await h.wait_events(1)
    await asyncio.sleep(0.05)
    events = h.sink_events()
    assert len(events) == 1, events
    return events[0]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["strip", "include_usage", "json"])
async def test_every_dialect_is_charged_its_reported_usage(
    start_proxy: StartProxy, fmt: str, mode: str
) -> None:
    h = await start_proxy(
        behaviour=Behaviour(format=fmt, cached_tokens=CACHED, reasoning_tokens=REASONING)
    )
    body: dict[str, Any] = dict(REQ, stream=mode != "json")
    if mode == "include_usage":
        body["stream_options"] = {"include_usage": True}
    status, reply, _ = await h.chat(body)
    assert status == 200
    event = await one_event(h)
    prompt, completion = truth(body)
    assert event["usage_source"] == "upstream", (fmt, mode)
    u = event["usage"]
    assert (u["prompt"], u["completion"]) == (prompt, completion)
    cached = 0 if fmt in ("gemini",) else CACHED  # Gemini's report has no cache field
    assert u["cached"] == cached
    # DeepSeek's and Moonshot's reports (as the fake renders them) have no reasoning.
    assert u["reasoning"] == (0 if fmt in ("deepseek", "moonshot") else REASONING)
    if mode == "strip" and fmt not in ("groq", "moonshot"):
        # The caller gets no usage it did not ask for, in any dialect.
        assert isinstance(reply, bytes)
        assert b"sage" not in reply.replace(b"message", b"")


@pytest.mark.parametrize(
    "usage",
    [
        {},
        "lots",
        True,
        None,
        {"prompt_tokens": "12", "completion_tokens": 3},
        {"prompt_tokens": 12, "completion_tokens": -3},
        {"prompt_tokens": 12, "completion_tokens": 2**70},
        {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        {"prompt_tokens": 12, "completion_tokens": 0},
        {"prompt_tokens": 12.5, "completion_tokens": [1]},
    ],
)
@pytest.mark.parametrize("stream", [True, False])
async def test_nothing_the_upstream_reports_makes_a_request_free(
    start_proxy: StartProxy, usage: Any, stream: bool
) -> None:
    h = await start_proxy(behaviour=Behaviour(usage_override=usage))
    status, _, _ = await h.chat(dict(REQ, stream=stream))
    assert status == 200
    event = await one_event(h)
    assert event["usage_source"] == "estimated"
    assert event["usage"]["prompt"] > 0 and event["usage"]["completion"] > 0
    assert event["credits"] >= 1


async def test_floats_round_up_and_huge_values_stay_within_the_contract(
    start_proxy: StartProxy,
) -> None:
    h = await start_proxy(
        behaviour=Behaviour(usage_override={"prompt_tokens": 11.2, "completion_tokens": 8.01})
    )
    await h.chat(dict(REQ, stream=True))
    event = await one_event(h)
    assert event["usage_source"] == "upstream"
    assert (event["usage"]["prompt"], event["usage"]["completion"]) == (12, 9)


@pytest.mark.parametrize("stream", [True, False])
async def test_a_pathological_prompt_is_charged_never_free(
    start_proxy: StartProxy, stream: bool
) -> None:
    """A million characters of whitespace panic tiktoken's core; the prompt is still
    charged (the byte bound), the request answered and nothing escapes."""
    h = await start_proxy(behaviour=Behaviour(usage_in_body=False, honour_stream_usage=False))
    body = {
        "model": "smart",
        "messages": [{"role": "user", "content": " \t" * 500_000}],
        "stream": stream,
    }
    status, _, _ = await h.chat(body)
    assert status == 200
    event = await one_event(h)
    assert event["usage_source"] == "estimated"
    assert event["usage"]["prompt"] >= 1_000_000
    # Through the registry: the request path's updates reach prometheus_client on collect.
    registry = h.state.observer.metrics.registry
    fallbacks = registry.get_sample_value(
        "llm_proxy_metering_fallbacks_total", {"reason": "count_failed"}
    )
    assert fallbacks == 1


async def test_a_large_prompt_is_counted_exactly_off_the_loop(start_proxy: StartProxy) -> None:
    h = await start_proxy(behaviour=Behaviour(usage_in_body=False))
    text = "the quick brown fox jumps over the lazy dog " * 8000
    body = {"model": "smart", "messages": [{"role": "user", "content": text}]}
    await h.chat(body)
    event = await one_event(h)
    enc = EncodingRegistry().get("o200k_base")
    assert event["usage_source"] == "estimated"
    assert event["usage"]["prompt"] == count_chat_prompt(enc, body)


# Added under the harness's aliases (its `smart` is the abort case).
DRAIN_ALIASES = """  drainy:
    provider: fake
    model: fake-model-r1
    price_rule: std
    allow_params: [x_fault]
    on_client_disconnect: drain
    drain_timeout_s: {timeout}
"""


async def leave_after_content(h: ProxyHarness, model: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{h.url}/v1/chat/completions",
            data=orjson.dumps(dict(REQ, model=model, stream=True)),
            headers=h.headers(),
        ) as resp,
    ):
        assert resp.status == 200
        for _ in range(3):
            await resp.content.readuntil(b"\n\n")
        resp.close()  # the caller hangs up before the usage arrives


@pytest.mark.parametrize(("model", "policy"), [("smart", "abort"), ("drainy", "drain")])
async def test_disconnect_policy(start_proxy: StartProxy, model: str, policy: str) -> None:
    """A reasoning model bills thinking the caller never sees: `drain` keeps reading
    after the caller left and charges the report, `abort` stops and estimates."""
    h = await start_proxy(
        behaviour=Behaviour(reasoning_tokens=500, chunk_delay=0.02, delay_before_usage=0.3),
        extra_aliases=DRAIN_ALIASES.format(timeout=5),
    )
    await leave_after_content(h, model)
    event = await one_event(h)
    assert event["client_disconnected"] is True
    assert event["outcome"] == "client_aborted"
    if policy == "drain":
        assert event["usage_source"] == "upstream"
        assert event["usage"]["reasoning"] == 500
        assert event["usage"]["completion"] >= 500
    else:
        assert event["usage_source"] == "estimated"
        assert event["usage"]["completion"] < 500


async def test_a_drain_ends_at_its_time_limit(start_proxy: StartProxy) -> None:
    h = await start_proxy(
        behaviour=Behaviour(reasoning_tokens=500, chunk_delay=0.02, delay_before_usage=5),
        extra_aliases=DRAIN_ALIASES.format(timeout=0.3),
    )
    await leave_after_content(h, "drainy")
    event = await one_event(h)
    assert event["client_disconnected"] is True
    assert event["usage_source"] == "estimated"  # no report within the drain: estimate
    assert h.recorder.closed_early == 1
