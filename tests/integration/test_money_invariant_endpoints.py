"""The money invariant (DESIGN "Money invariants" 1 and 2) for /v1/responses,
/v1/embeddings and /v1/completions, as a seeded random test against the fake
upstream: random bodies, behaviours (faults, usage values, no usage) and client
disconnect points; every request answered 200 yields exactly one charge event of
its endpoint, whose credits are at least the price of what the client received;
an error status yields none; nothing escapes the proxy."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import fields, replace
from typing import Any

import orjson
import pytest

from proxy.billing.counting import TokenCounter
from proxy.billing.encodings import EncodingRegistry
from proxy.billing.endpoint_replies import (
    completions_reply,
    completions_stream_reply,
    responses_reply,
    responses_stream_reply,
)
from proxy.billing.tokens import count_completion
from proxy.contract.charge_event import ChargeEvent
from proxy.devtools.fake_upstream import COUNTED, Behaviour
from proxy.upstream import sse
from tests.fixtures_proxy import StartProxy
from tests.integration.test_endpoints_proxy import ALIASES, PROVIDERS
from tests.integration.test_money_invariant import _fake, random_text, run_case

SEED = 2121
CASES = 90
OUTPUT_RATE = 2000  # the harness's `std` rule: credits per 1M completion tokens
USAGE_VALUES: list[Any] = [
    COUNTED,
    COUNTED,
    COUNTED,
    {},
    "12",
    None,
    [],
    {"input_tokens": 3.5, "output_tokens": 50.2},
    {"input_tokens": -1, "output_tokens": 5},
    {"input_tokens": 9, "output_tokens": 0},
    {"input_tokens": 10, "output_tokens": 2**64},
    {"prompt_tokens": 9, "completion_tokens": 0},
    {"prompt_tokens": 0, "total_tokens": 0},
    {"prompt_tokens": 9, "completion_tokens": "7"},
    {"prompt_tokens": 10**12, "completion_tokens": 10**12},
]
TOOL = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}


def random_body(rng: random.Random) -> tuple[str, dict[str, Any]]:
    kind = rng.choice(["responses", "responses", "embeddings", "completions"])
    stream = rng.random() < 0.7
    if kind == "responses":
        items: Any = random_text(rng) or "x"
        if rng.random() < 0.5:
            items = [{"role": "user", "content": [{"type": "input_text", "text": items}]}]
        body: dict[str, Any] = {"model": "multi", "input": items, "stream": stream}
        if rng.random() < 0.3:
            body["instructions"] = random_text(rng)
        if rng.random() < 0.25:
            body["tools"] = [TOOL]
        return "/v1/responses", body
    if kind == "embeddings":
        value: Any = rng.choice(
            [random_text(rng) or "x", ["a", random_text(rng) or "b"], [1, 2, 3], [[5, 6], [7]]]
        )
        return "/v1/embeddings", {"model": "multi", "input": value}
    body = {"model": "multi", "prompt": random_text(rng) or "x", "stream": stream}
    if stream and rng.random() < 0.4:
        body["stream_options"] = {"include_usage": True}
    return "/v1/completions", body


def random_behaviour(rng: random.Random, base: Behaviour) -> Behaviour:
    fault = rng.random()
    return replace(
        base,
        chunks=rng.randint(1, 12),
        usage_override=rng.choice(USAGE_VALUES),
        reasoning_tokens=rng.choice((0, 0, 300)),
        cached_tokens=rng.choice((0, 4)),
        reset_after=rng.randint(0, 5) if fault < 0.1 else None,
        stall_after=rng.randint(0, 5) if 0.1 <= fault < 0.15 else None,
        malformed_stream=0.15 <= fault < 0.2,
        status=rng.choice((429, 500)) if 0.2 <= fault < 0.25 else 200,
        invalid_json=0.25 <= fault < 0.3,
        usage_in_body=rng.random() < 0.8,
        honour_stream_usage=rng.random() < 0.8,
    )


def relayed_tokens(counter: TokenCounter, path: str, received: bytes, stream: bool) -> int:
    responses = path == "/v1/responses"
    if stream:
        objects = list(sse.iter_event_objects(received))
        reply = (responses_stream_reply if responses else completions_stream_reply)(objects)
    else:
        try:
            obj = orjson.loads(received)
        except orjson.JSONDecodeError:
            return 0
        if not isinstance(obj, dict) or path == "/v1/embeddings":
            return 0
        reply = (responses_reply if responses else completions_reply)(obj)
    return count_completion(counter, reply.text, reply.tool_calls)


@pytest.mark.timeout(300)
async def test_every_answered_request_of_every_endpoint_is_charged_once_and_enough(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture, shared_encodings: EncodingRegistry
) -> None:
    counter = TokenCounter(shared_encodings.get("o200k_base"))
    h = await start_proxy(extra_providers=PROVIDERS, extra_aliases=ALIASES, idle=0.3, first_byte=2)
    rng = random.Random(SEED)
    base = Behaviour()
    outcomes: dict[str, tuple[int, bytes, str, dict[str, Any]]] = {}
    with caplog.at_level(logging.ERROR):
        for case in range(CASES):
            path, body = random_body(rng)
            new = random_behaviour(rng, base)
            for f in fields(Behaviour):
                setattr(h.behaviour, f.name, getattr(new, f.name))
            rid = f"inv-{case}"
            status, received = await run_case(h, rng, rid, body, path)
            outcomes[rid] = (status, received, path, body)
        obs = h.state.observer
        for _ in range(300):
            if obs.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        await h.flush_events()
    assert obs.in_flight == 0
    escaped = [r for r in caplog.records if r.levelno >= logging.ERROR and not _fake(r)]
    assert not escaped, [r.getMessage() for r in escaped]

    events: dict[str, list[dict[str, Any]]] = {}
    for event in h.sink_events():
        events.setdefault(event["request_id"], []).append(event)
    answered = 0
    for rid, (status, received, path, body) in outcomes.items():
        got = events.get(rid, [])
        assert len(got) <= 1, (rid, got)
        if status == 200:
            answered += 1
            assert len(got) == 1, (rid, path, body)
            (event,) = got
            ChargeEvent.from_json(orjson.dumps(event))
            assert event["endpoint"] == path.removeprefix("/v1/")
            stream = bool(body.get("stream"))
            owed = math.ceil(relayed_tokens(counter, path, received, stream) * OUTPUT_RATE / 1e6)
            assert event["credits"] >= max(owed, 1), (rid, event, owed)
            assert event["usage"]["prompt"] >= 1
        elif status >= 400:
            assert got == [], (rid, status)
    assert answered > CASES // 2
