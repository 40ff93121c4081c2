"""relay_json / relay_stream / relay_error_status against a small upstream on a real
port, driven through a minimal aiohttp app that calls them the way the handler does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.billing.encodings import EncodingRegistry
from proxy.billing.payer import BillingContext
from proxy.billing.record import ChatRequest, ErrorKind, Exchange
from proxy.config.model import Alias, Provider, Timeouts
from proxy.contract.outcome import Outcome
from proxy.contract.usage import UsageSource
from proxy.server.app import error_middleware
from proxy.upstream.pools import UpstreamPools, upstream_body
from proxy.upstream.relay import relay_error_status, relay_json, relay_stream
from proxy.upstream.watchdog import Watchdog

REQUEST_ID = "req-ours-0001"
MESSAGES = [{"role": "user", "content": "hello there"}]
USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
UpstreamHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Rig:
    url: str
    session: aiohttp.ClientSession
    handler: UpstreamHandler | None = None
    timeouts: Timeouts = field(default_factory=lambda: Timeouts(first_byte=5, idle=5, total=30))
    exchanges: list[Exchange] = field(default_factory=list)
    upstream_bodies: list[dict[str, Any]] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    async def post(self, body: dict[str, Any]) -> tuple[int, bytes, Any]:
        async with self.session.post(f"{self.url}/relay", json=body) as resp:
            return resp.status, await resp.read(), resp.headers

    async def exchange(self) -> Exchange:
        await asyncio.wait_for(self.finished.wait(), 10)
        assert len(self.exchanges) == 1
        return self.exchanges[0]


@pytest.fixture
async def rig(shared_encodings: EncodingRegistry) -> AsyncIterator[Rig]:
    async def upstream(request: web.Request) -> web.StreamResponse:
        rig.upstream_bodies.append(await request.json())
        assert rig.handler is not None
        return await rig.handler(request)

    up_app = web.Application()
    up_app.router.add_post("/v1/chat/completions", upstream)
    up_server = TestServer(up_app, host="127.0.0.1")
    await up_server.start_server()
    provider = Provider(
        name="acme",
        base_url=f"http://127.0.0.1:{up_server.port}/v1",
        api_key_env=None,
        api_key=None,
    )
    pools = UpstreamPools.create({provider.name: provider})
    enc = shared_encodings.get("o200k_base")

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        alias = Alias(name="smart", provider=provider, model="up-1", price_rule=None)
        options = body.get("stream_options") or {}
        chat = ChatRequest(
            alias=alias,
            body=body,
            stream=bool(body.get("stream")),
            usage_requested=options.get("include_usage") is True,
        )
        ex = Exchange(time.perf_counter())
        ex.ctx = BillingContext.normalize(user_id=7, request_id=REQUEST_ID)
        ex.chat, ex.encoding = chat, enc
        rig.exchanges.append(ex)
        payload, strip = upstream_body(chat)
        wd = Watchdog(rig.timeouts)
        try:
            up = await pools.post(provider, payload, ex.request_id)
            if up.status >= 400:
                return await relay_error_status(up, ex, wd)
            if chat.stream and up.content_type == "text/event-stream":
                return await relay_stream(request, up, ex, wd, strip=strip)
            return await relay_json(up, ex, wd)
        finally:
            rig.finished.set()

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/relay", relay)
    server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    session = aiohttp.ClientSession()
    rig = Rig(url=f"http://127.0.0.1:{server.port}", session=session)
    try:
        yield rig
    finally:
        await session.close()
        await server.close()
        await pools.close()
        await up_server.close()


def ended(ex: Exchange) -> tuple[Outcome | None, int, ErrorKind | None]:
    return ex.outcome, ex.status, ex.error_kind


def chunk(content: str | None = None, *, usage: dict[str, int] | None = None) -> bytes:
    obj: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "choices": []}
    if content is not None:
        obj["choices"] = [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_upstream(
    events: list[bytes], *, then: str = "end", usage_chunk: bool = True
) -> UpstreamHandler:
    """Stream `events` (plus the usage chunk when asked for and [DONE]); `then`:
    "end" normally, "stall" (keep the socket, send nothing) or "reset"."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "x-request-id": "req_up_9"}
        )
        await resp.prepare(request)
        for event in events:
            await resp.write(event)
        if then == "stall":
            await asyncio.sleep(3600)
        if then == "reset":
            assert request.transport is not None
            request.transport.close()
            return resp
        if usage_chunk and (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(chunk(usage=USAGE))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    return handler


def sse_error(raw: bytes) -> dict[str, Any]:
    """The error object of the terminal `event: error` the relay appended."""
    assert raw.endswith(b"\n\n")
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    lines = last.split(b"\n")
    assert lines[0] == b"event: error", raw
    assert lines[1].startswith(b"data: ")
    return orjson.loads(lines[1][6:])["error"]


# -- relay_json ----------------------------------------------------------------------


async def test_json_reply_is_relayed_as_is_with_our_request_id(rig: Rig) -> None:
    reply = orjson.dumps({"id": "x", "choices": [], "usage": USAGE})

    async def handler(request: web.Request) -> web.Response:
        resp = web.Response(
            body=reply,
            content_type="application/json",
            headers={"x-request-id": "req_up_1", "openai-organization": "org-secret"},
        )
        resp.set_cookie("upstream", "secret")
        return resp

    rig.handler = handler
    status, raw, headers = await rig.post({"model": "smart", "messages": MESSAGES})
    assert (status, raw) == (200, reply)
    assert headers["X-Request-Id"] == REQUEST_ID
    assert headers["X-Upstream-Request-Id"] == "req_up_1"
    assert "Set-Cookie" not in headers and "OpenAI-Organization" not in headers
    assert rig.upstream_bodies[0]["model"] == "up-1"
    ex = await rig.exchange()
    assert ended(ex) == (Outcome.COMPLETED, 200, None)
    assert ex.metered is not None and ex.metered.source is UsageSource.UPSTREAM
    assert (ex.metered.usage.prompt_tokens, ex.metered.usage.completion_tokens) == (11, 3)
    assert ex.first_byte_at is not None


async def test_json_reply_without_usage_is_estimated(rig: Rig) -> None:
    async def handler(request: web.Request) -> web.Response:
        message = {"role": "assistant", "content": "four words right here"}
        return web.json_response({"choices": [{"index": 0, "message": message}]})

    rig.handler = handler
    status, _, _ = await rig.post({"model": "smart", "messages": MESSAGES})
    assert status == 200
    ex = await rig.exchange()
    assert ex.metered is not None and ex.metered.source is UsageSource.ESTIMATED
    assert ex.metered.usage.completion_tokens > 0 and ex.metered.usage.prompt_tokens > 0


async def test_json_body_that_stalls_after_the_head_is_504(rig: Rig) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b'{"id": "x"')
        await asyncio.sleep(3600)
        return resp

    rig.handler = handler
    rig.timeouts = Timeouts(first_byte=0.2, idle=0.2, total=30.0)
    status, raw, _ = await rig.post({"model": "smart", "messages": MESSAGES})
    assert status == 504
    assert orjson.loads(raw)["error"]["code"] == "upstream_timeout"
    ex = await rig.exchange()
    assert ended(ex) == (Outcome.TIMEOUT, 504, ErrorKind.TIMEOUT)
    assert_prompt_charged(ex)  # a 2xx head: the provider took (and bills) the prompt


def assert_prompt_charged(ex: Exchange) -> None:
    assert ex.metered is not None and ex.metered.source is UsageSource.ESTIMATED
    assert ex.metered.usage.prompt_tokens > 0 and ex.metered.usage.completion_tokens == 0


async def test_json_body_cut_by_the_upstream_is_502(rig: Rig) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b'{"id": "x"')
        assert request.transport is not None
        request.transport.close()
        return resp

    rig.handler = handler
    status, raw, _ = await rig.post({"model": "smart", "messages": MESSAGES})
    assert status == 502
    assert orjson.loads(raw)["error"]["code"] == "upstream_unavailable"
    ex = await rig.exchange()
    assert ended(ex) == (Outcome.UPSTREAM_ERROR, 502, ErrorKind.MID_STREAM)
    assert_prompt_charged(ex)


async def test_the_client_leaving_while_the_body_is_read_charges_the_prompt(rig: Rig) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b"{")
        head_sent.set()
        await asyncio.sleep(3600)
        return resp

    head_sent = asyncio.Event()
    rig.handler = handler
    post = asyncio.create_task(rig.post({"model": "smart", "messages": MESSAGES}))
    await asyncio.wait_for(head_sent.wait(), 10)
    await asyncio.sleep(0.3)  # let the relay get the head and start reading the body
    post.cancel()
    ex = await rig.exchange()
    assert ended(ex) == (Outcome.CLIENT_ABORTED, 499, None)
    assert ex.metered is not None and ex.metered.source is UsageSource.ESTIMATED
    assert ex.metered.usage.prompt_tokens > 0 and ex.metered.usage.completion_tokens == 0


# -- relay_error_status -------------------------------------------------------------


async def test_upstream_error_status_and_openai_body_are_relayed(rig: Rig) -> None:
    err = orjson.dumps({"error": {"message": "slow down", "type": "rate_limit", "code": "rl"}})

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            status=429,
            body=err,
            content_type="application/json",
            headers={"Retry-After": "7", "x-ratelimit-remaining-requests": "0"},
        )

    rig.handler = handler
    status, raw, headers = await rig.post({"model": "smart", "messages": MESSAGES})
    assert (status, raw) == (429, err)
    assert headers["Retry-After"] == "7"
    assert headers["X-Request-Id"] == REQUEST_ID
    assert "x-ratelimit-remaining-requests" not in headers
    ex = await rig.exchange()
    assert ended(ex) == (Outcome.UPSTREAM_ERROR, 429, ErrorKind.STATUS)


async def test_upstream_error_with_a_non_json_body_is_wrapped(rig: Rig) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=503, text="<html>down</html>", content_type="text/html")

    rig.handler = handler
    status, raw, headers = await rig.post({"model": "smart", "messages": MESSAGES, "stream": True})
    assert status == 503
    assert headers["Content-Type"].startswith("application/json")
    error = orjson.loads(raw)["error"]
    assert error["code"] == "upstream_http_503" and error["type"] == "upstream_error"


# -- relay_stream --------------------------------------------------------------------

EVENTS = [chunk("Hello"), chunk(" world"), chunk("!")]


async def test_stream_is_byte_faithful_when_the_caller_asked_for_usage(rig: Rig) -> None:
    rig.handler = sse_upstream(EVENTS)
    body = {
        "model": "smart",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, raw, headers = await rig.post(body)
    assert status == 200
    assert raw == b"".join(EVENTS) + chunk(usage=USAGE) + b"data: [DONE]\n\n"
    assert headers["X-Request-Id"] == REQUEST_ID
    assert headers["X-Upstream-Request-Id"] == "req_up_9"
    assert headers["Cache-Control"] == "no-cache"
    ex = await rig.exchange()
    assert (ex.outcome, ex.status) == (Outcome.COMPLETED, 200)
    assert ex.metered is not None and ex.metered.source is UsageSource.UPSTREAM
    assert ex.metered.usage.completion_tokens == 3


async def test_usage_chunk_asked_on_the_callers_behalf_is_stripped(rig: Rig) -> None:
    rig.handler = sse_upstream(EVENTS)
    status, raw, _ = await rig.post({"model": "smart", "messages": MESSAGES, "stream": True})
    assert status == 200
    assert rig.upstream_bodies[0]["stream_options"] == {"include_usage": True}
    assert raw == b"".join(EVENTS) + b"data: [DONE]\n\n"
    ex = await rig.exchange()
    assert ex.metered is not None and ex.metered.source is UsageSource.UPSTREAM
    assert ex.metered.usage.prompt_tokens == 11


async def test_stream_without_usage_is_estimated(rig: Rig) -> None:
    rig.handler = sse_upstream(EVENTS, usage_chunk=False)
    status, raw, _ = await rig.post({"model": "smart", "messages": MESSAGES, "stream": True})
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    ex = await rig.exchange()
    assert ex.metered is not None and ex.metered.source is UsageSource.ESTIMATED
    assert ex.metered.usage.completion_tokens > 0


async def test_an_unterminated_last_event_is_relayed_faithfully(rig: Rig) -> None:
    tail = b'data: {"id":"c1","choices":[]}'

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(EVENTS[0])
        await resp.write(tail)
        await resp.write_eof()
        return resp

    rig.handler = handler
    status, raw, _ = await rig.post({"model": "smart", "messages": MESSAGES, "stream": True})
    assert (status, raw) == (200, EVENTS[0] + tail)
    ex = await rig.exchange()
    assert ex.outcome is Outcome.COMPLETED


async def test_a_stall_mid_stream_ends_with_a_timeout_error_event(rig: Rig) -> None:
    rig.handler = sse_upstream(EVENTS[:1], then="stall")
    rig.timeouts = Timeouts(first_byte=5.0, idle=0.2, total=30.0)
    status, raw, _ = await rig.post({"model": "smart", "messages": MESSAGES, "stream": True})
    assert status == 200
    assert raw.startswith(EVENTS[0])
    error = sse_error(raw)
    assert error["code"] == "upstream_timeout" and error["type"] == "upstream_error"
    assert "idle" in error["message"]
    ex = await rig.exchange()
    assert ended(ex) == (Outcome.TIMEOUT, 200, ErrorKind.TIMEOUT)
    assert ex.metered is not None  # what was relayed is still metered


async def test_a_reset_mid_stream_ends_with_a_stream_error_event(rig: Rig) -> None:
    rig.handler = sse_upstream(EVENTS[:2], then="reset")
    status, raw, _ = await rig.post({"model": "smart", "messages": MESSAGES, "stream": True})
    assert status == 200
    assert raw.startswith(EVENTS[0] + EVENTS[1])
    assert sse_error(raw)["code"] == "upstream_stream_error"
    ex = await rig.exchange()
    assert ended(ex) == (Outcome.UPSTREAM_ERROR, 200, ErrorKind.MID_STREAM)
    assert ex.metered is not None and ex.metered.usage.completion_tokens > 0


async def test_the_client_leaving_mid_stream_is_an_abort(rig: Rig) -> None:
    rig.handler = sse_upstream(EVENTS[:1], then="stall")
    body = {"model": "smart", "messages": MESSAGES, "stream": True}
    async with rig.session.post(f"{rig.url}/relay", json=body) as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert first == EVENTS[0]
        resp.close()
    ex = await rig.exchange()
    assert ended(ex) == (Outcome.CLIENT_ABORTED, 499, None)
    assert ex.metered is not None


async def test_an_error_body_that_stalls_is_a_timeout(rig: Rig) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=503, headers={"Content-Type": "application/json"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b'{"error": ')
        await asyncio.sleep(3600)
        return resp

    rig.handler = handler
    rig.timeouts = Timeouts(first_byte=0.2, idle=0.2, total=30.0)
    status, raw, _ = await rig.post({"model": "smart", "messages": MESSAGES})
    assert status == 504
    assert orjson.loads(raw)["error"]["code"] == "upstream_timeout"
    ex = await rig.exchange()
    assert (ex.outcome, ex.error_kind) == (Outcome.TIMEOUT, ErrorKind.TIMEOUT)
