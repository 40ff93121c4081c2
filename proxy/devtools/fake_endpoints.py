"""The fake upstream's other endpoints: /v1/responses (typed SSE events, stored
responses for GET/DELETE), /v1/embeddings and legacy /v1/completions.

They obey the same `Behaviour` as chat (proxy.devtools.fake_upstream): usage or
none (`usage_in_body` for bodies, `honour_stream_usage` for streams), the usage
override, and the faults (error status, reset, stall, malformed event, invalid
JSON, delays). Usage is counted with the proxy's own offline rules, so reported
and estimated usage agree on these replies.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.billing.counting import TokenCounter
from proxy.billing.endpoint_tokens import (
    count_completions_prompt,
    count_embeddings_input,
    count_responses_input,
)
from proxy.billing.tokens import count_text
from proxy.devtools.fake_upstream import (
    BEHAVIOUR,
    COUNTED,
    ENCODINGS,
    RECORDER,
    WORDS,
    Behaviour,
)
from proxy.devtools.provider_formats import dumps  # writes fault values orjson will not

STORED = web.AppKey("stored_responses", dict)
Usage = dict[str, Any]


def _seed(body: dict[str, Any]) -> bytes:
    return hashlib.sha256(dumps(body.get("input", body.get("prompt")))).digest()


def _words(body: dict[str, Any], n: int) -> list[str]:
    seed = _seed(body)
    return [WORDS[(seed[i % len(seed)] + i) % len(WORDS)] for i in range(n)]


def _pieces(words: list[str]) -> list[str]:
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _counter(app: web.Application) -> TokenCounter:
    return TokenCounter(app[ENCODINGS].get("o200k_base"))


async def _begin(request: web.Request) -> tuple[dict[str, Any], Behaviour, web.Response | None]:
    """Read and record the body; the behaviour for it; an error reply when it says so."""
    body = await request.json(loads=orjson.loads)
    b = request.app[BEHAVIOUR].for_request(body)
    request.app[RECORDER].requests.append(
        {"headers": dict(request.headers), "body": body, "path": request.path}
    )
    if b.first_byte_delay:
        await asyncio.sleep(b.first_byte_delay)
    if b.status != 200:
        err = b.error_body or dumps(
            {"error": {"message": "fake failure", "type": "server_error", "param": None}}
        )
        return body, b, web.Response(status=b.status, body=err, content_type="application/json")
    return body, b, None


def _json(obj: Any, b: Behaviour) -> web.Response:
    if b.invalid_json:
        return web.Response(body=b"{not json", content_type="application/json")
    return web.Response(body=dumps(obj), content_type="application/json")


async def _stream(
    request: web.Request,
    b: Behaviour,
    head: list[bytes],
    deltas: list[bytes],
    tail: Callable[[], list[bytes]],
) -> web.StreamResponse:
    """Send `head`, one delta event per word (with the faults), then `tail()`."""
    rec = request.app[RECORDER]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    rec.open_connections += 1
    try:
        await resp.write(b"".join(head))
        for i, event in enumerate(deltas):
            if b.reset_after is not None and i == b.reset_after:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            if b.stall_after is not None and i == b.stall_after:
                await asyncio.sleep(3600)
            if b.malformed_stream and i == len(deltas) // 2:
                await resp.write(b"data: {this is not json\n\n")
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)
            await resp.write(event)
        if b.delay_before_usage:
            await asyncio.sleep(b.delay_before_usage)
        await resp.write(b"".join(tail()))
        await resp.write_eof()
    except (asyncio.CancelledError, ConnectionResetError):
        rec.closed_early += 1
        raise
    finally:
        rec.open_connections -= 1
    return resp


def _override(b: Behaviour, counted: Usage) -> Any:
    if b.usage_override != COUNTED:
        return b.usage_override
    return {**counted, **(b.usage_merge or {})}


# -- /v1/responses ------------------------------------------------------------------------


def _sse(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + dumps(obj) + b"\n\n"


def _responses_usage(app: web.Application, b: Behaviour, body: dict[str, Any], out: str) -> Any:
    counter = _counter(app)
    prompt = count_responses_input(counter, body)
    completion = count_text(counter, out) + b.reasoning_tokens
    return _override(
        b,
        {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": min(b.cached_tokens, prompt)},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": b.reasoning_tokens},
            "total_tokens": prompt + completion,
        },
    )


def _function_tool(body: dict[str, Any]) -> str | None:
    tools = body.get("tools")
    if body.get("tool_choice") == "none" or not isinstance(tools, list):
        return None
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "function":
            name = tool.get("name")
            return name if isinstance(name, str) else "fn"
    return None


async def responses_create(request: web.Request) -> web.StreamResponse:
    app = request.app
    body, b, error = await _begin(request)
    if error is not None:
        return error
    ident = "resp_" + _seed(body).hex()[:24]
    item_id = "msg_" + ident[5:]
    pieces = _pieces(_words(body, b.chunks))
    tool = _function_tool(body)
    if tool is not None:  # a function call: its arguments stream instead of text
        item_id = "fc_" + ident[5:]
        pieces = ['{"words": "', *(p.strip() + " " for p in pieces), '"}']
    base: dict[str, Any] = {
        "id": ident,
        "object": "response",
        "created_at": 1_700_000_000,
        "model": body.get("model"),
        "status": "in_progress",
        "output": [],
        "usage": None,
    }

    def item(done: bool) -> dict[str, Any]:
        status = "completed" if done else "in_progress"
        if tool is not None:
            args = "".join(pieces) if done else ""
            return {
                "id": item_id,
                "type": "function_call",
                "status": status,
                "name": tool,
                "call_id": "call_" + ident[5:15],
                "arguments": args,
            }
        parts = [{"type": "output_text", "text": "".join(pieces), "annotations": []}]
        return {
            "id": item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": parts if done else [],
        }

    def final() -> dict[str, Any]:
        usage = _responses_usage(app, b, body, "".join(pieces))
        done = {**base, "status": "completed", "output": [item(True)]}
        done["usage"] = (
            usage if (b.honour_stream_usage if body.get("stream") else b.usage_in_body) else None
        )
        if body.get("store", True) is not False:
            app[STORED][ident] = {"response": done, "input": body.get("input")}
        return done

    if not body.get("stream"):
        return _json(final(), b)
    seq = iter(range(1_000_000))
    head = [
        _sse({"type": "response.created", "sequence_number": next(seq), "response": base}),
        _sse({"type": "response.in_progress", "sequence_number": next(seq), "response": base}),
        _sse(
            {
                "type": "response.output_item.added",
                "sequence_number": next(seq),
                "output_index": 0,
                "item": item(False),
            }
        ),
    ]
    kind = "response.function_call_arguments.delta" if tool else "response.output_text.delta"
    where = {"item_id": item_id, "output_index": 0}
    if tool is None:
        where["content_index"] = 0
        head.append(
            _sse(
                {
                    "type": "response.content_part.added",
                    "sequence_number": next(seq),
                    **where,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                }
            )
        )
    deltas = [
        _sse({"type": kind, "sequence_number": next(seq), **where, "delta": p}) for p in pieces
    ]

    def tail() -> list[bytes]:
        done = final()
        out = [
            _sse(
                {
                    "type": "response.output_item.done",
                    "sequence_number": next(seq),
                    "output_index": 0,
                    "item": done["output"][0],
                }
            )
        ]
        out.append(
            _sse({"type": "response.completed", "sequence_number": next(seq), "response": done})
        )
        return out

    return await _stream(request, b, head, deltas, tail)


def _stored(request: web.Request) -> dict[str, Any] | None:
    return request.app[STORED].get(request.match_info["response_id"])


def _not_found(request: web.Request) -> web.Response:
    err = {
        "message": f"No response found with id '{request.match_info['response_id']}'.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    return web.Response(status=404, body=dumps({"error": err}), content_type="application/json")


async def responses_get(request: web.Request) -> web.Response:
    request.app[RECORDER].requests.append(
        {"headers": dict(request.headers), "path": request.path, "query": dict(request.query)}
    )
    stored = _stored(request)
    return _not_found(request) if stored is None else web.json_response(stored["response"])


async def responses_delete(request: web.Request) -> web.Response:
    rid = request.match_info["response_id"]
    if request.app[STORED].pop(rid, None) is None:
        return _not_found(request)
    return web.json_response({"id": rid, "object": "response", "deleted": True})


async def responses_input_items(request: web.Request) -> web.Response:
    stored = _stored(request)
    if stored is None:
        return _not_found(request)
    items = stored["input"]
    if isinstance(items, str):
        items = [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": items}]}
        ]
    data = [{"id": f"msg_{i}", **item} for i, item in enumerate(items or [])]
    return web.json_response({"object": "list", "data": data, "has_more": False})


# -- /v1/embeddings -----------------------------------------------------------------------


async def embeddings(request: web.Request) -> web.Response:
    body, b, error = await _begin(request)
    if error is not None:
        return error
    value = body["input"]
    count = len(value) if isinstance(value, list) and not isinstance(value[0], int) else 1
    dims = body.get("dimensions") or 8
    seed = _seed(body)
    data = []
    for i in range(count):
        vector = [((seed[(i + d) % len(seed)] / 255.0) - 0.5) for d in range(dims)]
        emb: Any = vector
        if body.get("encoding_format") == "base64":
            emb = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    prompt = count_embeddings_input(_counter(request.app), body)
    reply: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model")}
    if b.usage_in_body:
        reply["usage"] = _override(b, {"prompt_tokens": prompt, "total_tokens": prompt})
    return _json(reply, b)


# -- /v1/completions ----------------------------------------------------------------------


def _completions_usage(app: web.Application, b: Behaviour, body: dict[str, Any], out: str) -> Any:
    counter = _counter(app)
    prompt = count_completions_prompt(counter, body)
    completion = count_text(counter, out)
    return _override(
        b,
        {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    )


async def completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    body, b, error = await _begin(request)
    if error is not None:
        return error
    ident = "cmpl-" + _seed(body).hex()[:24]
    pieces = _pieces(_words(body, b.chunks))
    base = {
        "id": ident,
        "object": "text_completion",
        "created": 1_700_000_000,
        "model": body.get("model"),
    }
    if not body.get("stream"):
        text = "".join(pieces)
        reply: dict[str, Any] = {
            **base,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
        }
        if b.usage_in_body:
            reply["usage"] = _completions_usage(app, b, body, text)
        return _json(reply, b)
    include = bool((body.get("stream_options") or {}).get("include_usage"))
    null = {"usage": None} if include else {}

    def chunk(text: str, finish: str | None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return b"data: " + dumps({**base, "choices": [choice], **null}) + b"\n\n"

    def tail() -> list[bytes]:
        out = [chunk("", "stop")]
        if include and b.honour_stream_usage:
            usage = _completions_usage(app, b, body, "".join(pieces))
            out.append(b"data: " + dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        return [*out, b"data: [DONE]\n\n"]

    return await _stream(request, b, [], [chunk(p, None) for p in pieces], tail)


def add_routes(app: web.Application) -> None:
    app[STORED] = {}
    app.router.add_post("/v1/responses", responses_create)
    app.router.add_get("/v1/responses/{response_id}", responses_get)
    app.router.add_delete("/v1/responses/{response_id}", responses_delete)
    app.router.add_get("/v1/responses/{response_id}/input_items", responses_input_items)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/completions", completions)
