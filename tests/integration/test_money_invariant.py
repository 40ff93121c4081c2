"""The money invariant (docs: /work/shared DESIGN "Money invariants" 1 and 2), as a
seeded random test against the fake upstream:

for random request bodies, random upstream behaviours (dialects, faults, usage
values) and random client disconnect points, every request that got a 200 response
head yields exactly one charge event, whose credits are at least the price of the
text the client received, and no exception escapes the proxy. (Upstream error
statuses are relayed and not charged, as documented: zero events for them.)
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import random
import struct
import traceback
from dataclasses import fields, replace
from typing import Any

import aiohttp
import orjson
import pytest
import tiktoken

from proxy.billing.encodings import EncodingRegistry
from proxy.billing.metering import completion_parts, message_reply
from proxy.billing.tokens import count_completion
from proxy.contract.charge_event import ChargeEvent
from proxy.devtools.fake_upstream import COUNTED, Behaviour
from proxy.devtools.provider_formats import FORMATS
from proxy.upstream import sse
from tests.fixtures_proxy import ProxyHarness, StartProxy

SEED = 1515
CASES = 150
OUTPUT_RATE = 2000  # the harness's `std` rule: credits per 1M completion tokens
# Added under the harness's aliases (its `smart` is the abort case).
ALIASES = """  drainy:
    provider: fake
    model: fake-model-r1
    price_rule: std
    allow_params: [x_fault]
    on_client_disconnect: drain
    drain_timeout_s: 0.3
"""
USAGE_VALUES: list[Any] = [
    COUNTED,
    COUNTED,
    COUNTED,
    {},
    "12",
    None,
    True,
    [],
    {"prompt_tokens": 3.5, "completion_tokens": 50.2},
    {"prompt_tokens": -1, "completion_tokens": 5},
    {"prompt_tokens": 10, "completion_tokens": 2**64},
    {"prompt_tokens": 10**12, "completion_tokens": 10**12},
    {"prompt_tokens": 0, "completion_tokens": 0},
    {"prompt_tokens": 9, "completion_tokens": 0},
    {"prompt_tokens": 9, "completion_tokens": "7"},
    {"prompt_tokens": 9, "completion_tokens": 500, "total_tokens": 10**10},
]


def random_text(rng: random.Random) -> str:
    alphabet = ["hello", " world", "Grüße", "世界", "\n", "  ", "🙂", "x" * 30, "{", "\t"]
    if rng.random() < 0.03:
        return " \t" * 150_000  # long whitespace: tiktoken's core panics on it
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))


def random_body(rng: random.Random, case: int) -> dict[str, Any]:
    content: Any = random_text(rng)
    if rng.random() < 0.3:
        png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + struct.pack(">II", 900, 1400) + b"\0" * 9
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        content = [
            {"type": "text", "text": random_text(rng)},
            {"type": "image_url", "image_url": {"url": url, "detail": rng.choice(["low", "high"])}},
        ]
    body: dict[str, Any] = {
        "model": rng.choice(["smart", "drainy"]),
        "messages": [{"role": "user", "content": content, "name": f"u{case}"}],
        "stream": rng.random() < 0.75,
    }
    if body["stream"] and rng.random() < 0.4:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.2:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {"a": {"type": "string", "description": random_text(rng)}},
                    },
                },
            }
        ]
    if rng.random() < 0.1:
        schema = {"type": "object", "properties": {"x": {"type": "string"}}}
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "r", "schema": schema},
        }
    return body


def random_behaviour(rng: random.Random, base: Behaviour) -> Behaviour:
    fault = rng.random()
    return replace(
        base,
        format=rng.choice(FORMATS),
        chunks=rng.randint(1, 12),
        usage_override=rng.choice(USAGE_VALUES),
        reasoning_tokens=rng.choice((0, 0, 300)),
        cached_tokens=rng.choice((0, 4)),
        reset_after=rng.randint(0, 5) if fault < 0.1 else None,
        stall_after=rng.randint(0, 5) if 0.1 <= fault < 0.15 else None,
        malformed_stream=0.15 <= fault < 0.2,
        status=rng.choice((429, 500, 503)) if 0.2 <= fault < 0.25 else 200,
        usage_in_body=rng.random() < 0.85,
        honour_stream_usage=rng.random() < 0.85,
        delay_before_usage=rng.choice((0.0, 0.0, 0.05)),
    )


async def run_case(
    h: ProxyHarness,
    rng: random.Random,
    rid: str,
    body: dict[str, Any],
    path: str = "/v1/chat/completions",
) -> tuple[int, bytes]:
    """Send one request and leave at a random point; returns (status, bytes received)."""
    leave = rng.random()
    headers = {**h.headers(), "X-Request-Id": rid, "Content-Type": "application/json"}
    url = f"{h.url}{path}"
    async with aiohttp.ClientSession() as session:
        if leave < 0.1:  # may leave before the response head
            task = asyncio.ensure_future(_read(session, url, body, headers))
            await asyncio.sleep(rng.uniform(0, 0.02))
            task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                return -1, b""
        async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
            if leave < 0.45 and resp.status == 200 and body.get("stream"):
                received = b""
                for _ in range(rng.randint(0, 6)):
                    try:
                        received += await resp.content.readuntil(b"\n\n")
                    except (aiohttp.ClientError, ValueError):
                        break
                resp.close()
                return resp.status, received
            try:
                return resp.status, await resp.read()
            except aiohttp.ClientError:
                return resp.status, b""


async def _read(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, bytes]:
    async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
        return resp.status, await resp.read()


def relayed_tokens(enc: tiktoken.Encoding, received: bytes, stream: bool) -> int:
    """Completion tokens of what the client received (what must be paid for at least)."""
    if stream:
        text, calls = completion_parts(sse.iter_event_objects(received))
        return count_completion(enc, text, calls)
    try:
        obj = orjson.loads(received)
    except orjson.JSONDecodeError:
        return 0
    reply = message_reply(obj) if isinstance(obj, dict) else None
    return count_completion(enc, reply.text, reply.tool_calls) if reply else 0


def _fake(record: logging.LogRecord) -> bool:
    """An error of the fake upstream's own handler (the proxy hung up on it): aiohttp
    logs those too, and they are not the proxy's."""
    tb = record.exc_info[2] if record.exc_info else None
    files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb)]
    return any(f.endswith(("fake_upstream.py", "fake_endpoints.py")) for f in files)


@pytest.mark.timeout(300)
async def test_every_answered_request_is_charged_once_and_enough(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture, shared_encodings: EncodingRegistry
) -> None:
    enc = shared_encodings.get("o200k_base")
    h = await start_proxy(extra_aliases=ALIASES, idle=0.3, first_byte=2)
    rng = random.Random(SEED)
    base = Behaviour()
    outcomes: dict[str, tuple[int, bytes, dict[str, Any]]] = {}
    with caplog.at_level(logging.ERROR):
        for case in range(CASES):
            body = random_body(rng, case)
            new = random_behaviour(rng, base)
            for f in fields(Behaviour):  # the fake reads its (started) app's object
                setattr(h.behaviour, f.name, getattr(new, f.name))
            rid = f"inv-{case}"
            status, received = await run_case(h, rng, rid, body)
            outcomes[rid] = (status, received, body)
        obs = h.state.observer
        for _ in range(300):  # requests whose client left settle on their own
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
    for rid, (status, received, body) in outcomes.items():
        got = events.get(rid, [])
        assert len(got) <= 1, (rid, got)
        if status == 200:
            answered += 1
            assert len(got) == 1, (rid, body["model"], body["stream"])
            (event,) = got
            ChargeEvent.from_json(orjson.dumps(event))  # the ledger's strict reader takes it
            owed = math.ceil(relayed_tokens(enc, received, body["stream"]) * OUTPUT_RATE / 1e6)
            assert event["credits"] >= max(owed, 1), (rid, event, owed)
            assert event["usage"]["prompt"] >= 1
        elif status >= 400:
            assert got == [], (rid, status)
    assert answered > CASES // 2  # the generator exercised the money path
