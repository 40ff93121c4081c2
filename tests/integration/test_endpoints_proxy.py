"""/v1/responses, /v1/embeddings and /v1/completions through the proxy against the
fake upstream: relay, usage (reported or estimated), charges, refusals."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.billing.counting import TokenCounter
from proxy.billing.encodings import EncodingRegistry
from proxy.billing.endpoint_replies import completions_stream_reply, responses_stream_reply
from proxy.billing.endpoint_tokens import (
    count_completions_prompt,
    count_embeddings_input,
    count_responses_input,
)
from proxy.billing.tokens import count_text
from proxy.devtools.fake_upstream import Behaviour
from proxy.upstream import sse
from tests.fixtures_proxy import ProxyHarness, StartProxy

PROVIDERS = """  chatonly:
    base_url: http://127.0.0.1:9/v1
    responses: false
"""
ALIASES = """
  multi: {provider: fake, model: fake-multi, price_rule: std, tokenizer: o200k_base,
          endpoints: [chat, responses, embeddings, completions], allow_params: [x_fault]}
  embed: {provider: fake, model: fake-embed, price_rule: std, endpoints: [embeddings]}
  oldchat: {provider: chatonly, model: m, price_rule: std, endpoints: [chat, responses]}
"""
RESPONSE_REQ = {
    "model": "multi",
    "instructions": "Be brief.",
    "input": [{"role": "user", "content": [{"type": "input_text", "text": "Count the figs."}]}],
}


def counter() -> TokenCounter:
    return TokenCounter(EncodingRegistry().get("o200k_base"))


async def start(start_proxy: StartProxy, **kw: Any) -> ProxyHarness:
    return await start_proxy(extra_providers=PROVIDERS, extra_aliases=ALIASES, **kw)


async def post(
    h: ProxyHarness, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    async with h.session.post(
        f"{h.url}{path}", data=orjson.dumps(body), headers=headers or h.headers()
    ) as resp:
        raw = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, orjson.loads(raw), resp.headers
        return resp.status, raw, resp.headers


async def settled(h: ProxyHarness, n: int = 1) -> list[dict[str, Any]]:
    events = await h.wait_events(n)
    await asyncio.sleep(0.05)
    events = h.sink_events()
    assert len(events) == n, events
    return events


def std_credits(prompt: int, completion: int, cached: int = 0) -> int:
    # std: 1000 input / 500 cached / 2000 output credits per 1M tokens, rounded up.
    return math.ceil(((prompt - cached) * 1000 + cached * 500 + completion * 2000) / 1e6)


# -- /v1/responses --------------------------------------------------------------------------


async def test_responses_non_stream_charges_the_reported_usage(start_proxy: StartProxy) -> None:
    h = await start(start_proxy, behaviour=Behaviour(cached_tokens=3, reasoning_tokens=4))
    status, body, headers = await post(h, "/v1/responses", RESPONSE_REQ)
    assert status == 200 and body["object"] == "response"
    assert h.recorder.requests[0]["body"]["model"] == "fake-multi"
    u = body["usage"]
    (event,) = await settled(h)
    assert event["endpoint"] == "responses"
    assert event["usage_source"] == "upstream"
    assert (
        event["usage"]["prompt"]
        == u["input_tokens"]
        == count_responses_input(counter(), RESPONSE_REQ)
    )
    assert event["usage"]["completion"] == u["output_tokens"]
    assert event["usage"]["cached"] == 3 and event["usage"]["reasoning"] == 4
    assert event["credits"] == std_credits(u["input_tokens"], u["output_tokens"], 3)
    assert event["request_id"] == headers["X-Request-Id"]


async def test_responses_stream_is_relayed_byte_for_byte(start_proxy: StartProxy) -> None:
    h = await start(start_proxy)
    req = {**RESPONSE_REQ, "stream": True}
    status, got, headers = await post(h, "/v1/responses", req)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    async with h.session.post(
        f"{h.upstream_url}/responses", json={**req, "model": "fake-multi"}
    ) as resp:
        want = await resp.read()
    assert got == want
    assert b"event: response.completed" in got
    (event,) = await settled(h)
    completed = [o for o in sse.iter_event_objects(got) if o["type"] == "response.completed"]
    u = completed[0]["response"]["usage"]
    assert event["endpoint"] == "responses" and event["stream"] is True
    assert event["usage_source"] == "upstream"
    assert (event["usage"]["prompt"], event["usage"]["completion"]) == (
        u["input_tokens"],
        u["output_tokens"],
    )


async def test_responses_stream_without_usage_is_estimated(start_proxy: StartProxy) -> None:
    h = await start(start_proxy, behaviour=Behaviour(honour_stream_usage=False))
    _, got, _ = await post(h, "/v1/responses", {**RESPONSE_REQ, "stream": True})
    text = responses_stream_reply(sse.iter_event_objects(got)).text
    assert text
    (event,) = await settled(h)
    assert event["usage_source"] == "estimated"
    assert event["usage"]["prompt"] == count_responses_input(counter(), RESPONSE_REQ)
    assert event["usage"]["completion"] == count_text(counter(), text)


async def test_responses_non_stream_without_usage_is_estimated(start_proxy: StartProxy) -> None:
    h = await start(start_proxy, behaviour=Behaviour(usage_in_body=False))
    _, body, _ = await post(h, "/v1/responses", RESPONSE_REQ)
    assert body["usage"] is None
    (event,) = await settled(h)
    assert event["usage_source"] == "estimated"
    text = body["output"][0]["content"][0]["text"]
    assert event["usage"]["completion"] == count_text(counter(), text)


async def test_responses_function_call_arguments_are_estimated(start_proxy: StartProxy) -> None:
    h = await start(start_proxy, behaviour=Behaviour(honour_stream_usage=False))
    tool = {
        "type": "function",
        "name": "count",
        "description": "Counts words.",
        "parameters": {"type": "object", "properties": {"words": {"type": "string"}}},
    }
    req = {**RESPONSE_REQ, "tools": [tool], "stream": True}
    _, got, _ = await post(h, "/v1/responses", req)
    reply = responses_stream_reply(sse.iter_event_objects(got))
    ((name, args),) = reply.tool_calls
    assert name == "count" and args.startswith('{"words"')
    (event,) = await settled(h)
    assert event["usage_source"] == "estimated"
    c = counter()
    assert event["usage"]["completion"] == count_text(c, name) + count_text(c, args)
    # Tools are part of the input: the estimate counts them.
    assert (
        event["usage"]["prompt"]
        == count_responses_input(c, req)
        > count_responses_input(c, RESPONSE_REQ)
    )


async def test_responses_client_disconnect_is_charged_for_what_was_relayed(
    start_proxy: StartProxy,
) -> None:
    h = await start(start_proxy, behaviour=Behaviour(chunks=100, chunk_delay=0.01))
    received = b""
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            f"{h.url}/v1/responses", headers=h.headers(), json={**RESPONSE_REQ, "stream": True}
        )
        while received.count(b"response.output_text.delta") < 12:  # 6 events (name twice)
            received += await resp.content.readany()
        resp.close()
    (event,) = await settled(h)
    assert event["outcome"] == "client_aborted" and event["client_disconnected"] is True
    assert event["endpoint"] == "responses"
    assert event["usage_source"] == "estimated"
    text = responses_stream_reply(sse.iter_event_objects(received)).text
    assert event["usage"]["completion"] >= count_text(counter(), text) > 0
    assert event["usage"]["prompt"] == count_responses_input(counter(), RESPONSE_REQ)


async def test_responses_upstream_reset_mid_stream(start_proxy: StartProxy) -> None:
    h = await start(start_proxy, behaviour=Behaviour(chunks=20, reset_after=6))
    _, got, _ = await post(h, "/v1/responses", {**RESPONSE_REQ, "stream": True})
    assert b"event: error" in got
    (event,) = await settled(h)
    assert event["outcome"] == "upstream_error" and event["usage_source"] == "estimated"
    text = responses_stream_reply(sse.iter_event_objects(got)).text
    assert event["usage"]["completion"] == count_text(counter(), text) > 0


async def test_responses_refusals(start_proxy: StartProxy) -> None:
    h = await start(start_proxy)
    status, body, _ = await post(h, "/v1/responses", {**RESPONSE_REQ, "model": "smart"})
    assert status == 400 and body["error"]["code"] == "unsupported_endpoint"
    assert "serves: chat" in body["error"]["message"]
    status, body, _ = await post(h, "/v1/responses", {**RESPONSE_REQ, "model": "oldchat"})
    assert status == 400 and body["error"]["code"] == "unsupported_endpoint"
    assert "responses: false" in body["error"]["message"]
    status, body, _ = await post(h, "/v1/responses", {**RESPONSE_REQ, "background": True})
    assert status == 400 and body["error"]["code"] == "unsupported_parameter"
    web = {**RESPONSE_REQ, "tools": [{"type": "web_search"}]}
    status, body, _ = await post(h, "/v1/responses", web)
    assert status == 400 and body["error"]["param"] == "tools"
    status, body, _ = await post(h, "/v1/responses", {"model": "multi"})
    assert status == 400 and body["error"]["param"] == "input"
    await h.flush_events()
    assert h.sink_events() == [] and h.recorder.requests == []


async def test_stored_responses_pass_through_uncharged(start_proxy: StartProxy) -> None:
    h = await start(start_proxy)
    _, created, _ = await post(h, "/v1/responses", {**RESPONSE_REQ, "input": "hi"})
    rid = created["id"]
    await settled(h)
    async with h.session.get(f"{h.url}/v1/responses/{rid}?model=multi", headers=h.headers()) as r:
        assert r.status == 200
        assert (await r.json())["id"] == rid
    seen = h.recorder.requests[-1]
    assert "model" not in seen["query"]  # the proxy's own parameter stays here
    # Only one provider serves responses here: no alias needed.
    url = f"{h.url}/v1/responses/{rid}/input_items"
    async with h.session.get(url, headers=h.headers()) as r:
        assert r.status == 200
        assert (await r.json())["data"][0]["content"][0]["text"] == "hi"
    async with h.session.delete(
        f"{h.url}/v1/responses/{rid}", headers=h.headers(**{"X-Model-Alias": "multi"})
    ) as r:
        assert r.status == 200 and (await r.json())["deleted"] is True
    async with h.session.get(f"{h.url}/v1/responses/{rid}", headers=h.headers()) as r:
        assert r.status == 404
    async with h.session.get(f"{h.url}/v1/responses/{rid}?model=smart", headers=h.headers()) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "unsupported_endpoint"
    async with h.session.get(f"{h.url}/v1/responses/{rid}") as r:
        assert r.status == 401  # callers only
    await h.flush_events()
    assert len(h.sink_events()) == 1  # the POST alone


# -- /v1/embeddings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["the quick brown fox", ["one text", "and another"], [1, 2, 3, 4, 5], [[1, 2], [3, 4, 5]]],
    ids=["string", "strings", "tokens", "token_arrays"],
)
async def test_embeddings_inputs_charge_the_input_rate(start_proxy: StartProxy, value) -> None:
    h = await start(start_proxy, behaviour=Behaviour(usage_in_body=False))
    req = {"model": "embed", "input": value, "dimensions": 4, "encoding_format": "base64"}
    status, body, _ = await post(h, "/v1/embeddings", req)
    assert status == 200 and isinstance(body["data"][0]["embedding"], str)
    assert h.recorder.requests[0]["body"]["dimensions"] == 4  # passed through
    assert h.recorder.requests[0]["body"]["encoding_format"] == "base64"
    (event,) = await settled(h)
    expected = count_embeddings_input(counter(), req)
    if isinstance(value, list) and not isinstance(value[0], str):
        assert expected == sum(len(v) if isinstance(v, list) else 1 for v in value)
    assert event["endpoint"] == "embeddings" and event["usage_source"] == "estimated"
    assert event["usage"]["prompt"] == expected and event["usage"]["completion"] == 0
    assert event["credits"] == std_credits(expected, 0)


async def test_embeddings_reported_usage(start_proxy: StartProxy) -> None:
    h = await start(start_proxy)
    status, body, _ = await post(h, "/v1/embeddings", {"model": "multi", "input": ["a b", "c"]})
    assert status == 200 and len(body["data"]) == 2
    (event,) = await settled(h)
    assert event["usage_source"] == "upstream"
    assert event["usage"]["prompt"] == body["usage"]["prompt_tokens"]
    assert event["usage"]["completion"] == 0


async def test_embeddings_refusals(start_proxy: StartProxy) -> None:
    h = await start(start_proxy)
    for body, param in (
        ({"model": "smart", "input": "x"}, "model"),
        ({"model": "embed", "input": []}, "input"),
        ({"model": "embed", "input": [1, "x"]}, "input"),
        ({"model": "embed", "input": "x", "stream": True}, "stream"),
        ({"model": "embed", "input": "x", "dimensions": 0}, "dimensions"),
    ):
        status, got, _ = await post(h, "/v1/embeddings", body)
        assert status == 400 and got["error"]["param"] == param, got
    status, got, _ = await post(
        h,
        "/v1/chat/completions",
        {"model": "embed", "messages": [{"role": "user", "content": "x"}]},
    )
    assert status == 400 and got["error"]["code"] == "unsupported_endpoint"
    assert h.recorder.requests == []


async def test_embeddings_upstream_error_is_not_charged(start_proxy: StartProxy) -> None:
    h = await start(start_proxy, behaviour=Behaviour(status=503))
    status, _, _ = await post(h, "/v1/embeddings", {"model": "embed", "input": "x"})
    assert status == 503
    await h.flush_events()
    assert h.sink_events() == []


# -- /v1/completions ------------------------------------------------------------------------

COMPLETION_REQ = {"model": "multi", "prompt": "Once upon a time", "max_tokens": 8}


async def test_completions_non_stream(start_proxy: StartProxy) -> None:
    h = await start(start_proxy)
    status, body, _ = await post(h, "/v1/completions", COMPLETION_REQ)
    assert status == 200 and body["object"] == "text_completion"
    (event,) = await settled(h)
    assert event["endpoint"] == "completions" and event["usage_source"] == "upstream"
    assert event["usage"]["prompt"] == body["usage"]["prompt_tokens"]
    assert event["usage"]["completion"] == body["usage"]["completion_tokens"]


async def test_completions_stream_usage_asked_for_and_removed(start_proxy: StartProxy) -> None:
    h = await start(start_proxy)
    req = {**COMPLETION_REQ, "stream": True}
    status, got, _ = await post(h, "/v1/completions", req)
    assert status == 200 and got.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in got  # the caller did not ask for it
    assert h.recorder.requests[0]["body"]["stream_options"] == {"include_usage": True}
    (event,) = await settled(h)
    assert event["usage_source"] == "upstream" and event["stream"] is True
    text = completions_stream_reply(sse.iter_event_objects(got)).text
    assert event["usage"]["completion"] == count_text(counter(), text)
    assert event["usage"]["prompt"] == count_completions_prompt(counter(), req)


async def test_completions_stream_without_usage_is_estimated(start_proxy: StartProxy) -> None:
    h = await start(start_proxy, stream_usage=False)
    req = {**COMPLETION_REQ, "prompt": ["first prompt", "second one"], "stream": True}
    _, got, _ = await post(h, "/v1/completions", req)
    text = completions_stream_reply(sse.iter_event_objects(got)).text
    (event,) = await settled(h)
    assert event["usage_source"] == "estimated"
    assert event["usage"]["prompt"] == count_completions_prompt(counter(), req)
    assert event["usage"]["completion"] == count_text(counter(), text) > 0


async def test_completions_client_disconnect(start_proxy: StartProxy) -> None:
    h = await start(start_proxy, behaviour=Behaviour(chunks=100, chunk_delay=0.01))
    received = b""
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            f"{h.url}/v1/completions", headers=h.headers(), json={**COMPLETION_REQ, "stream": True}
        )
        while received.count(b'"text":"') < 5:
            received += await resp.content.readany()
        resp.close()
    (event,) = await settled(h)
    assert event["outcome"] == "client_aborted" and event["endpoint"] == "completions"
    text = completions_stream_reply(sse.iter_event_objects(received)).text
    assert event["usage"]["completion"] >= count_text(counter(), text) > 0


async def test_models_list_the_endpoints_of_each_alias(start_proxy: StartProxy) -> None:
    h = await start(start_proxy)
    async with h.session.get(f"{h.url}/v1/models", headers=h.headers()) as r:
        data = {m["id"]: m["endpoints"] for m in (await r.json())["data"]}
    assert data["smart"] == ["chat"]
    assert data["multi"] == ["chat", "responses", "embeddings", "completions"]
    assert data["embed"] == ["embeddings"]
    assert data["oldchat"] == ["chat"]  # its provider does not speak the Responses API


DRAIN_ALIAS = """  drainy: {provider: fake, model: fake-drain, price_rule: std,
            endpoints: [responses, completions], on_client_disconnect: drain,
            drain_timeout_s: 5}
"""


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/completions"])
async def test_drain_policy_reads_the_usage_after_the_client_left(
    start_proxy: StartProxy, path: str
) -> None:
    h = await start_proxy(
        extra_providers=PROVIDERS,
        extra_aliases=ALIASES + DRAIN_ALIAS,
        behaviour=Behaviour(chunks=30, chunk_delay=0.01),
    )
    body = {**(RESPONSE_REQ if path == "/v1/responses" else COMPLETION_REQ), "stream": True}
    body["model"] = "drainy"
    async with aiohttp.ClientSession() as s:
        resp = await s.post(f"{h.url}{path}", headers=h.headers(), json=body)
        await resp.content.readany()
        resp.close()
    (event,) = await settled(h)
    assert event["outcome"] == "client_aborted" and event["client_disconnected"] is True
    assert event["usage_source"] == "upstream"  # drained until the report came
    assert event["endpoint"] == path.removeprefix("/v1/")


async def test_responses_stall_and_broken_body(start_proxy: StartProxy) -> None:
    h = await start(start_proxy, behaviour=Behaviour(stall_after=3), idle=0.3)
    status, got, _ = await post(h, "/v1/responses", {**RESPONSE_REQ, "stream": True})
    assert status == 200 and b"event: error" in got and b"upstream_timeout" in got
    (event,) = await settled(h)
    assert event["outcome"] == "timeout" and event["usage_source"] == "estimated"
    h.behaviour.stall_after = None
    h.behaviour.invalid_json = True
    async with h.session.post(
        f"{h.url}/v1/responses", json=RESPONSE_REQ, headers=h.headers()
    ) as resp:
        assert resp.status == 200 and await resp.read() == b"{not json"  # relayed as received
    _, second = await settled(h, 2)
    assert second["usage_source"] == "estimated"
    assert second["usage"]["prompt"] == count_responses_input(counter(), RESPONSE_REQ)
