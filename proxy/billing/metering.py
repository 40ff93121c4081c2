"""Metering: the usage of one request, from the upstream's report or an estimate.

Streams are watched by proxy.upstream.stream_meter, which hands this module the
usage report it found or the relayed events to estimate from.

The upstream's own usage report is the truth. When it never arrives (client
disconnected, upstream died or timed out, provider without stream usage) the
prompt is counted locally with OpenAI's chat counting rules and the completion
from what was actually relayed to the client, so a call that ended badly is
still billed for what it produced.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import tiktoken

from proxy.billing.tokens import count_chat_prompt, count_completion
from proxy.billing.usage_parts import with_priced_parts
from proxy.contract.usage import Usage, UsageSource


@dataclass(frozen=True, slots=True)
class Metered:
    usage: Usage
    source: UsageSource


def usage_from_report(report: Mapping[str, Any]) -> Usage | None:
    """OpenAI's usage object → Usage, clamped to be internally consistent.

    Returns None when the object is not a usable report (then we estimate).
    """
    try:
        prompt = int(report.get("prompt_tokens") or 0)
        completion = int(report.get("completion_tokens") or 0)
        pdetails = report.get("prompt_tokens_details") or {}
        cdetails = report.get("completion_tokens_details") or {}
        cached = int(pdetails.get("cached_tokens") or 0) if isinstance(pdetails, dict) else 0
        reasoning = int(cdetails.get("reasoning_tokens") or 0) if isinstance(cdetails, dict) else 0
    except (TypeError, ValueError, AttributeError):
        return None
    if prompt < 0 or completion < 0:
        return None
    # Subsets by definition; a provider that reports otherwise is clamped rather
    # than trusted to make a cached token cost more than nothing.
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=min(max(cached, 0), prompt),
        reasoning_tokens=min(max(reasoning, 0), completion),
    )
    return with_priced_parts(usage, report, pdetails, cdetails)


def meter_json(body: bytes, request_body: Mapping[str, Any], enc: tiktoken.Encoding) -> Metered:
    """Usage of a non-streaming response body; estimated when the body has none."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        report = obj.get("usage")
        if isinstance(report, dict):
            usage = usage_from_report(report)
            if usage is not None:
                return Metered(usage, UsageSource.UPSTREAM)
        content, tool_args = _message_parts(obj)
    else:
        content, tool_args = "", []
    return Metered(
        Usage(
            prompt_tokens=count_chat_prompt(enc, request_body),
            completion_tokens=count_completion(enc, content, tool_args),
        ),
        UsageSource.ESTIMATED,
    )


def estimate_prompt_only(request_body: Mapping[str, Any], enc: tiktoken.Encoding) -> Metered:
    """Nothing was relayed (e.g. upstream died before the first chunk after we
    started the response): only the prompt was consumed."""
    return Metered(Usage(prompt_tokens=count_chat_prompt(enc, request_body)), UsageSource.ESTIMATED)


def estimate_stream(
    events: Iterable[Mapping[str, Any]], request_body: Mapping[str, Any], enc: tiktoken.Encoding
) -> Metered:
    """A stream without a usage report: the prompt, and what was relayed (`events`:
    the decoded JSON objects of the relayed SSE events)."""
    content, tool_args = completion_parts(events)
    return Metered(
        Usage(
            prompt_tokens=count_chat_prompt(enc, request_body),
            completion_tokens=count_completion(enc, content, tool_args),
        ),
        UsageSource.ESTIMATED,
    )


def completion_parts(
    events: Iterable[Mapping[str, Any]],
) -> tuple[str, list[tuple[str, str]]]:
    """Text and tool-call name/argument fragments the client actually received."""
    texts: list[str] = []
    # Streamed tool calls arrive as fragments keyed by (choice, call index); they
    # are joined per call first because BPE counts of pieces differ from the whole.
    calls: dict[tuple[Any, Any], list[str]] = {}
    for obj in events:
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            for key in ("content", "refusal", "reasoning_content"):
                value = delta.get(key)
                if isinstance(value, str):
                    texts.append(value)
            fragments = delta.get("tool_calls")
            if not isinstance(fragments, list):
                continue
            for frag in fragments:
                fn = frag.get("function") if isinstance(frag, dict) else None
                if not isinstance(fn, dict):
                    continue
                parts = calls.setdefault((choice.get("index"), frag.get("index")), ["", ""])
                if isinstance(fn.get("name"), str):
                    parts[0] += fn["name"]
                if isinstance(fn.get("arguments"), str):
                    parts[1] += fn["arguments"]
    return "".join(texts), [(name, args) for name, args in calls.values()]


def _message_parts(obj: Mapping[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    texts: list[str] = []
    tools: list[tuple[str, str]] = []
    for choice in obj.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        for key in ("content", "refusal", "reasoning_content"):
            value = message.get(key)
            if isinstance(value, str):
                texts.append(value)
        _collect_tool_calls(message.get("tool_calls"), tools)
    return "".join(texts), tools


def _collect_tool_calls(calls: Any, out: list[tuple[str, str]]) -> None:
    if not isinstance(calls, list):
        return
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            name, args = fn.get("name"), fn.get("arguments")
            out.append(
                (name if isinstance(name, str) else "", args if isinstance(args, str) else "")
            )
