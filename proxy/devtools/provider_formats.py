"""Provider dialects of the chat.completions wire format, for the fake upstream.

The fake builds every reply the OpenAI way (a list of chunk objects and an OpenAI
usage object); `stream_events` and `json_body` re-shape it the way a provider
does (see proxy.billing.usage_report for the table the proxy reads them with).
"""

from __future__ import annotations

import json
from typing import Any, Final

import orjson

FORMATS: Final = (
    "openai",
    "groq",  # usage under x_groq.usage (streams), sent whether asked or not
    "deepseek",  # prompt_cache_hit_tokens / prompt_cache_miss_tokens
    "moonshot",  # usage inside choices[0] of the last chunk; cached_tokens at top level
    "gemini",  # completion_tokens without thinking; total_tokens with it
    "litellm",  # usage on the last chunk that still has choices, no usage-only chunk
    "escaped",  # the usage key written as "\u0075sage"
    "choices_object",  # `choices` a single object instead of a list
    "crlf",  # CRLF separators after an LF-terminated comment
    "cr",  # lone-CR separators
)
_ESCAPED_KEY: Final = b'"\\u0075sage"'


def provider_usage(fmt: str, usage: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI usage object as `fmt` reports it (a fault's object goes as it is)."""
    counts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens")]
    if fmt not in ("deepseek", "moonshot", "gemini") or not all(type(c) is int for c in counts):
        return usage
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    reasoning = usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0)
    if fmt == "deepseek":
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_cache_hit_tokens": cached,
            "prompt_cache_miss_tokens": prompt - cached,
        }
    if fmt == "moonshot":
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cached_tokens": cached,
        }
    if fmt == "gemini":
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion - reasoning,
            "total_tokens": prompt + completion,
        }
    return usage


def stream_events(
    fmt: str,
    chunks: list[dict[str, Any]],
    usage: Any,
    include_usage: bool,
    honour: bool = True,
) -> list[bytes]:
    """The SSE events of a stream: `chunks` (the role, content and finish chunks, in
    OpenAI's shape) and `usage` (an OpenAI usage object, or any value a fault wants
    to send), as `fmt` sends them. `[DONE]` included."""
    sends = honour and include_usage
    shaped = provider_usage(fmt, usage) if isinstance(usage, dict) else usage
    objs = [dict(c) for c in chunks]
    last = objs[-1]
    tail: list[dict[str, Any]] = []
    if fmt == "groq":
        last["x_groq"] = {"id": "req_fake", "usage": shaped}
    elif fmt == "moonshot":
        last["choices"] = [{**last["choices"][0], "usage": shaped}]
    elif fmt == "litellm":
        if sends:
            last["usage"] = shaped
    elif sends:
        for obj in objs:
            obj["usage"] = None
        tail.append({**{k: v for k, v in last.items() if k != "choices"}, "choices": []})
        tail[0]["usage"] = shaped
    if fmt == "choices_object":
        for obj in objs:
            obj["choices"] = obj["choices"][0]
        for obj in tail:
            obj["choices"] = None
    sep, preamble = b"\n\n", b""
    if fmt == "crlf":
        sep, preamble = b"\r\n\r\n", b": PROCESSING\n\n"
    elif fmt == "cr":
        sep = b"\r\r"
    out = [preamble] if preamble else []
    for obj in objs + tail:
        raw = dumps(obj)
        if fmt == "escaped":
            raw = raw.replace(b'"usage"', _ESCAPED_KEY)
        out.append(b"data: " + raw + sep)
    out.append(b"data: [DONE]" + sep)
    return out


def json_body(fmt: str, reply: dict[str, Any], usage: Any) -> bytes:
    """A non-streamed reply as `fmt` sends it (`usage` None: no usage at all)."""
    body = dict(reply)
    if usage is not None:
        body["usage"] = provider_usage(fmt, usage) if isinstance(usage, dict) else usage
    if fmt == "groq":
        body["x_groq"] = {"id": "req_fake"}
    if fmt == "choices_object":
        body["choices"] = body["choices"][0]
    raw = dumps(body)
    return raw.replace(b'"usage"', _ESCAPED_KEY) if fmt == "escaped" else raw


def dumps(obj: Any) -> bytes:
    # Faults send values orjson will not write (integers over 64 bits, NaN): send
    # them the way a Python upstream would.
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()
