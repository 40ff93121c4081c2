"""A small OpenAI-compatible fake upstream: deterministic replies, no network needed.

Used by the offline demo, the tests (which drive its fault modes through
`Behaviour`) and the benchmarks. It reports usage counted with the same offline
tokenizer the proxy uses, so upstream and estimated usage agree on its replies.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web

from proxy.billing.encodings import EncodingRegistry
from proxy.billing.tokens import count_chat_prompt, count_text
from proxy.devtools.provider_formats import FORMATS, json_body, stream_events

# `Behaviour.usage_override` left alone: the fake reports the usage it counted.
COUNTED = "counted"

WORDS = (
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"),
    *("seven", "wizards", "quietly", "hex", "every", "jumbo", "box", "of", "pickled"),
    *("figs", "near", "the", "old", "harbour", "lighthouse", "tonight"),
)


@dataclass(slots=True)
class Behaviour:
    """What the fake does; tests change it between requests."""

    chunks: int = 8  # content chunks per streamed reply (one word each)
    chunk_delay: float = 0.0  # seconds between streamed chunks
    first_byte_delay: float = 0.0  # seconds before the response head
    honour_stream_usage: bool = True  # send the usage chunk when include_usage is asked
    usage_in_body: bool = True  # non-streaming replies carry `usage`
    status: int = 200  # answer this status with an error body instead of a reply
    error_body: bytes | None = None  # body for `status` (default: OpenAI-shaped JSON)
    error_headers: dict[str, str] | None = None  # with `status`, e.g. Retry-After
    reset_after: int | None = None  # streamed: drop the connection after N content chunks
    stall_after: int | None = None  # streamed: stop sending (but keep the socket) after N
    malformed_stream: bool = False  # streamed: send a non-JSON data event mid-stream
    invalid_json: bool = False  # non-streamed: a body that is not JSON
    cached_tokens: int = 0  # reported as prompt_tokens_details.cached_tokens
    reasoning_tokens: int = 0  # reported as completion_tokens_details.reasoning_tokens
    cache_write_tokens: int = 0  # reported as prompt_tokens_details.cache_write_tokens
    audio_prompt_tokens: int = 0  # prompt_tokens_details.audio_tokens (added to the prompt)
    audio_completion_tokens: int = 0  # completion_tokens_details.audio_tokens (added too)
    # Provider dialect of the reply (proxy.devtools.provider_formats.FORMATS).
    format: str = "openai"
    # Sent instead of the counted usage object: any JSON value (faults: strings,
    # floats, huge numbers, {}), or a dict merged over the counted fields.
    usage_override: Any = COUNTED
    usage_merge: dict[str, Any] | None = None
    delay_before_usage: float = 0.0  # seconds between the last content chunk and usage
    # When set, a request body field of this name picks a fault for that request only
    # ("reset", "stall", "malformed" or "status:<code>"), so one run can mix faults
    # into normal traffic (bench/soak.py). The proxy forwards unknown fields as is.
    fault_field: str | None = None

    def for_request(self, body: dict[str, Any]) -> Behaviour:
        fault = body.get(self.fault_field) if self.fault_field else None
        if not isinstance(fault, str):
            return self
        if fault == "reset":
            return replace(self, reset_after=self.chunks // 2)
        if fault == "stall":
            return replace(self, stall_after=self.chunks // 2)
        if fault == "malformed":
            return replace(self, malformed_stream=True)
        if fault.startswith("status:") and fault[7:].isdigit():
            return replace(self, status=int(fault[7:]))
        return self


@dataclass(slots=True)
class Recorder:
    requests: list[dict[str, Any]] = field(default_factory=list)
    open_connections: int = 0
    closed_early: int = 0  # streams whose client went away before the end


BEHAVIOUR = web.AppKey("behaviour", Behaviour)
RECORDER = web.AppKey("recorder", Recorder)
ENCODINGS = web.AppKey("encodings", EncodingRegistry)


def reply_words(body: dict[str, Any], n: int) -> list[str]:
    seed = hashlib.sha256(orjson.dumps(body.get("messages"))).digest()
    return [WORDS[(seed[i % len(seed)] + i) % len(WORDS)] for i in range(n)]


def _usage(app: web.Application, body: dict[str, Any], text: str) -> Any:
    b = app[BEHAVIOUR].for_request(body)
    if b.usage_override != COUNTED:
        return b.usage_override
    enc = app[ENCODINGS].get("o200k_base")
    prompt = count_chat_prompt(enc, body) + b.audio_prompt_tokens
    completion = count_text(enc, text) + b.reasoning_tokens + b.audio_completion_tokens
    pdetails = {"cached_tokens": min(b.cached_tokens, prompt)}
    cdetails = {"reasoning_tokens": b.reasoning_tokens}
    if b.cache_write_tokens:
        pdetails["cache_write_tokens"] = b.cache_write_tokens
    if b.audio_prompt_tokens:
        pdetails["audio_tokens"] = b.audio_prompt_tokens
    if b.audio_completion_tokens:
        cdetails["audio_tokens"] = b.audio_completion_tokens
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": pdetails,
        "completion_tokens_details": cdetails,
    }
    return {**usage, **(b.usage_merge or {})}


async def chat(request: web.Request) -> web.StreamResponse:
    app = request.app
    body = await request.json(loads=orjson.loads)
    b = app[BEHAVIOUR].for_request(body)
    app[RECORDER].requests.append({"headers": dict(request.headers), "body": body})
    if b.first_byte_delay:
        await asyncio.sleep(b.first_byte_delay)
    if b.status != 200:
        err = b.error_body or orjson.dumps(
            {
                "error": {
                    "message": "fake failure",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        )
        return web.Response(
            status=b.status, body=err, content_type="application/json", headers=b.error_headers
        )
    ident = "chatcmpl-" + hashlib.sha256(orjson.dumps(body.get("messages"))).hexdigest()[:24]
    model = body.get("model", "fake")
    words = reply_words(body, b.chunks)
    if not body.get("stream"):
        if b.invalid_json:
            return web.Response(body=b"{not json", content_type="application/json")
        text = " ".join(words)
        reply: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
        }
        usage = _usage(app, body, text) if b.usage_in_body else None
        return web.Response(
            body=json_body(b.format, reply, usage),
            content_type="application/json",
            headers={"x-request-id": "req_fake_" + ident[-8:], "openai-processing-ms": "1"},
        )
    return await _stream(request, b, body, ident, model, words)


async def _stream(
    request: web.Request,
    b: Behaviour,
    body: dict[str, Any],
    ident: str,
    model: str,
    words: list[str],
) -> web.StreamResponse:
    app = request.app
    rec = app[RECORDER]
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "x-request-id": "req_fake_" + ident[-8:]}
    )
    try:
        # The head first: counting the usage may load an encoding (~0.25 s).
        await resp.prepare(request)
    except ConnectionResetError:
        rec.closed_early += 1  # the proxy hung up before the head
        raise
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    base = {"id": ident, "object": "chat.completion.chunk", "created": 1700000000, "model": model}
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    chunks = [{**base, "choices": [_choice({"role": "assistant", "content": ""})]}]
    chunks += [{**base, "choices": [_choice({"content": p})]} for p in pieces]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    fmt = b.format if b.format in FORMATS else "openai"
    # Usage only shapes the last events; it is counted once the content is out
    # (counting may load an encoding, ~0.25 s, which must not delay the first chunk).
    events = stream_events(fmt, chunks, {}, include_usage, b.honour_stream_usage)
    first = 1 if fmt == "crlf" else 0  # the comment preamble
    rec.open_connections += 1
    try:
        await resp.write(b"".join(events[: first + 1]))
        for i in range(len(words)):
            if b.reset_after is not None and i == b.reset_after:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            if b.stall_after is not None and i == b.stall_after:
                await asyncio.sleep(3600)
            if b.malformed_stream and i == len(words) // 2:
                await resp.write(b"data: {this is not json\n\n")
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)
            await resp.write(events[first + 1 + i])
        usage = _usage(app, body, "".join(pieces))
        events = stream_events(fmt, chunks, usage, include_usage, b.honour_stream_usage)
        rest = events[first + 1 + len(words) :]
        await resp.write(rest[0])  # the finish chunk
        if b.delay_before_usage:
            await asyncio.sleep(b.delay_before_usage)
        await resp.write(b"".join(rest[1:]))
        await resp.write_eof()
    except (asyncio.CancelledError, ConnectionResetError):
        rec.closed_early += 1
        raise
    finally:
        rec.open_connections -= 1
    return resp


def _choice(delta: dict[str, Any]) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "finish_reason": None}


async def models(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": "fake-model",
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "fake",
                }
            ],
        }
    )


def build_fake_app(behaviour: Behaviour | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[BEHAVIOUR] = behaviour or Behaviour()
    app[RECORDER] = Recorder()
    app[ENCODINGS] = EncodingRegistry()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    from proxy.devtools.fake_endpoints import add_routes  # it builds on this module

    add_routes(app)
    return app
