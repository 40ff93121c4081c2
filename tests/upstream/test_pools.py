"""The upstream request body, the headers sent upstream and the headers relayed back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.billing.record import ChatRequest
from proxy.config.model import Alias, Provider
from proxy.errors import ApiError
from proxy.upstream.pools import RELAYED_HEADERS, UpstreamPools, relay_headers, upstream_body

MESSAGES = [{"role": "user", "content": "hi"}]


def provider(
    *, stream_usage: bool = True, api_key: str | None = "sk-provider", base_url: str = "http://u/v1"
) -> Provider:
    return Provider(
        name="acme",
        base_url=base_url,
        api_key_env="ACME_KEY" if api_key else None,
        api_key=api_key,
        stream_usage=stream_usage,
    )


def chat(
    body: dict[str, Any], *, stream_usage: bool = True, usage_requested: bool = False
) -> ChatRequest:
    alias = Alias(
        name="smart", provider=provider(stream_usage=stream_usage), model="up-1", price_rule=None
    )
    return ChatRequest(
        alias=alias,
        body=body,
        stream=bool(body.get("stream")),
        usage_requested=usage_requested,
    )


def sent(chat_request: ChatRequest) -> tuple[dict[str, Any], bool]:
    payload, strip = upstream_body(chat_request)
    return orjson.loads(payload), strip


# -- upstream_body -----------------------------------------------------------------


def test_model_is_rewritten_and_everything_else_forwarded() -> None:
    body = {"model": "smart", "messages": MESSAGES, "temperature": 0.2, "x_vendor": [1, {"a": 2}]}
    out, strip = sent(chat(body))
    assert out == {**body, "model": "up-1"}
    assert strip is False
    assert body["model"] == "smart"  # the caller's body is not changed


def test_stream_asks_for_usage_and_strips_it_when_the_caller_did_not() -> None:
    body = {"model": "smart", "messages": MESSAGES, "stream": True}
    out, strip = sent(chat(body))
    assert out["stream_options"] == {"include_usage": True}
    assert strip is True
    assert "stream_options" not in body


def test_other_stream_options_of_the_caller_are_kept() -> None:
    body = {"model": "smart", "messages": MESSAGES, "stream": True, "stream_options": {"x": 1}}
    out, strip = sent(chat(body))
    assert out["stream_options"] == {"x": 1, "include_usage": True}
    assert strip is True
    assert body["stream_options"] == {"x": 1}


def test_include_usage_false_from_the_caller_is_overridden_and_stripped() -> None:
    options = {"include_usage": False}
    body = {"model": "smart", "messages": MESSAGES, "stream": True, "stream_options": options}
    out, strip = sent(chat(body))
    assert out["stream_options"] == {"include_usage": True}
    assert strip is True


def test_caller_asking_for_usage_gets_the_body_as_is() -> None:
    options = {"include_usage": True}
    body = {"model": "smart", "messages": MESSAGES, "stream": True, "stream_options": options}
    out, strip = sent(chat(body, usage_requested=True))
    assert out == {**body, "model": "up-1"}
    assert strip is False


def test_provider_without_stream_usage_gets_no_stream_options() -> None:
    body = {"model": "smart", "messages": MESSAGES, "stream": True}
    out, strip = sent(chat(body, stream_usage=False))
    assert "stream_options" not in out
    assert strip is False


def test_non_streamed_requests_get_no_stream_options() -> None:
    out, strip = sent(chat({"model": "smart", "messages": MESSAGES}))
    assert "stream_options" not in out
    assert strip is False


def nested_body(depth: int) -> dict[str, Any]:
    """A body (parsed the way the proxy parses it) nesting `depth` levels in all."""
    raw = b'{"model":"smart","messages":[{"role":"user","content":"x"}],"deep":'
    raw += b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    body = orjson.loads(raw)
    assert isinstance(body, dict)
    return body


@pytest.mark.parametrize("depth", [256, 300, 700, 1024])
def test_a_body_nested_too_deep_to_forward_is_400_invalid_json(depth: int) -> None:
    with pytest.raises(ApiError) as info:
        upstream_body(chat(nested_body(depth)))
    assert info.value.status == 400
    assert info.value.code == "invalid_json"
    assert "255" in info.value.message


def test_a_body_nested_within_the_limit_is_forwarded() -> None:
    out, _ = sent(chat(nested_body(200)))
    assert out["model"] == "up-1"


# -- relay_headers -----------------------------------------------------------------


def upstream_headers(pairs: list[tuple[str, str]]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_only_the_allowed_headers_are_relayed() -> None:
    up = upstream_headers(
        [
            ("Content-Type", "application/json"),
            ("OpenAI-Processing-Ms", "12"),
            ("OpenAI-Version", "2020-10-01"),
            ("Retry-After", "3"),
            ("Retry-After-Ms", "3000"),
            ("Set-Cookie", "session=abc"),
            ("OpenAI-Organization", "org-secret"),
            ("X-RateLimit-Remaining-Tokens", "100"),
            ("Connection", "keep-alive"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "10"),
            ("Server", "cloudflare"),
        ]
    )
    out = relay_headers(up)
    assert {k.lower(): v for k, v in out.items()} == {
        "content-type": "application/json",
        "openai-processing-ms": "12",
        "openai-version": "2020-10-01",
        "retry-after": "3",
        "retry-after-ms": "3000",
    }
    assert set(RELAYED_HEADERS) == {k.lower() for k in out}


def test_upstream_request_id_is_renamed() -> None:
    out = relay_headers(upstream_headers([("x-request-id", "req_up_1")]))
    assert dict(out) == {"X-Upstream-Request-Id": "req_up_1"}
    assert "X-Request-Id" not in out


def test_no_headers_relay_nothing() -> None:
    assert len(relay_headers(upstream_headers([]))) == 0


# -- headers_for / post ------------------------------------------------------------


def test_headers_for_carries_the_provider_key_and_our_request_id_only() -> None:
    headers = UpstreamPools({}).headers_for(provider(api_key="sk-provider"), "req-123")
    assert headers == {
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
        "X-Client-Request-Id": "req-123",
        "Authorization": "Bearer sk-provider",
    }


def test_headers_for_a_provider_without_key_has_no_authorization() -> None:
    headers = UpstreamPools({}).headers_for(provider(api_key=None), "req-1")
    assert "Authorization" not in headers
    assert headers["X-Client-Request-Id"] == "req-1"


@pytest.fixture
async def echo_upstream() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        await request.read()
        resp = web.json_response({"ok": True})
        resp.set_cookie("upstream_session", "s3cr3t")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}/v1", seen
    finally:
        await server.close()


async def test_post_sends_only_our_headers_and_keeps_no_cookies(
    echo_upstream: tuple[str, list[dict[str, str]]],
) -> None:
    base_url, seen = echo_upstream
    p = provider(base_url=base_url)
    pools = UpstreamPools.create({p.name: p})
    try:
        for rid in ("req-a", "req-b"):
            up = await pools.post(p, b'{"model":"up-1"}', rid)
            assert up.status == 200
            await up.read()
            up.release()
    finally:
        await pools.close()
    assert [h["X-Client-Request-Id"] for h in seen] == ["req-a", "req-b"]
    for h in seen:
        assert h["Authorization"] == "Bearer sk-provider"
        assert "User-Agent" not in h
    # The cookie the upstream set for the first caller is not sent for the second.
    assert "Cookie" not in seen[1]
