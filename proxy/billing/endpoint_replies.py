"""What the client received of a reply, for the endpoints beside chat.completions
(chat's own readers are in proxy.billing.metering): the text and (name, arguments)
tool calls an estimate counts as the completion."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from proxy.billing.metering import Reply
from proxy.billing.usage_report import choices_of

# -- legacy completions: choices[].text ------------------------------------------------


def completions_reply(obj: Mapping[str, Any]) -> Reply:
    return Reply("".join(_str(c.get("text")) for c in choices_of(obj)))


def completions_stream_reply(events: Iterable[Mapping[str, Any]]) -> Reply:
    return Reply("".join(_str(c.get("text")) for obj in events for c in choices_of(obj)))


# -- embeddings: vectors, no completion -------------------------------------------------


def no_reply(obj: Any) -> Reply:
    return Reply()


# -- the Responses API -------------------------------------------------------------------

_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.output_audio_transcript.delta",
    }
)
_ARG_DELTAS = frozenset(
    {"response.function_call_arguments.delta", "response.custom_tool_call_input.delta"}
)
_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def responses_reply(obj: Mapping[str, Any]) -> Reply:
    """A Response object's output: message text and refusals, reasoning summaries,
    function (and custom tool) calls."""
    texts: list[str] = []
    calls: list[tuple[str, str]] = []
    output = obj.get("output")
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type")
        if kind == "message":
            for part in _parts(item.get("content")):
                texts.append(_str(part.get("text")) + _str(part.get("refusal")))
        elif kind == "reasoning":
            for part in _parts(item.get("summary")) + _parts(item.get("content")):
                texts.append(_str(part.get("text")))
        elif kind == "function_call":
            calls.append((_str(item.get("name")), _str(item.get("arguments"))))
        elif kind == "custom_tool_call":
            calls.append((_str(item.get("name")), _str(item.get("input"))))
    return Reply("".join(texts), tuple(calls))


def responses_stream_reply(events: Iterable[Mapping[str, Any]]) -> Reply:
    """The typed events' deltas: text, and call arguments joined per output item
    (named by its `response.output_item.added`); a stream that relayed no delta
    but a final response counts that response's output."""
    texts: list[str] = []
    calls: dict[Any, list[str]] = {}
    final: Mapping[str, Any] | None = None
    for obj in events:
        kind = obj.get("type")
        if kind in _TEXT_DELTAS:
            texts.append(_str(obj.get("delta")))
        elif kind in _ARG_DELTAS:
            calls.setdefault(obj.get("output_index"), ["", ""])[1] += _str(obj.get("delta"))
        elif kind == "response.output_item.added":
            item = obj.get("item")
            if isinstance(item, Mapping) and item.get("type") in (
                "function_call",
                "custom_tool_call",
            ):
                calls.setdefault(obj.get("output_index"), ["", ""])[0] += _str(item.get("name"))
        elif kind in _FINAL and isinstance(obj.get("response"), Mapping):
            final = obj["response"]
    reply = Reply("".join(texts), tuple((name, args) for name, args in calls.values()))
    if final is not None and not reply.text and not any(args for _, args in reply.tool_calls):
        return responses_reply(final)
    return reply


def _parts(value: Any) -> list[Mapping[str, Any]]:
    return [p for p in value if isinstance(p, Mapping)] if isinstance(value, list) else []


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""
