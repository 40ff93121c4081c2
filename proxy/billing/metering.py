"""Metering: the usage of one request, from the upstream's report or an estimate.

Streams are watched by proxy.upstream.stream_meter, which hands this module the
usage report it found or the relayed events to estimate from.

The upstream's own usage report is the truth when it is plausible
(proxy.billing.usage_report validates it; it must also cover at least one token
per non-empty piece of text relayed). Otherwise the prompt is counted locally with
OpenAI's chat counting rules and the completion from what was actually relayed to
the client, so a call that ended badly is still billed for what it produced.

An estimate never fails and never stalls the event loop: inputs up to
INLINE_COUNT_CHARS are counted at once (a few ms at worst); larger ones are first
bounded (UTF-8 bytes, flag BOUNDED) and the caller may refine that bound off the
loop with `estimate_off_loop`. Whatever happens to the refinement, a charge has
the bound to fall back on, never nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import orjson
import tiktoken

from proxy.billing.counting import TokenCounter
from proxy.billing.tokens import count_chat_prompt, count_completion
from proxy.billing.usage_report import MAPPING, UsageReport, choices_of, find_report
from proxy.contract.charge_event import MAX_TOKENS
from proxy.contract.records import record
from proxy.contract.usage import Usage, UsageSource

if TYPE_CHECKING:
    from proxy.billing.wire_formats import WireFormat

# Request + reply characters counted on the event loop; measured worst cases at
# this size (runs of whitespace, one 64K-letter word) take ~25 ms, plain text ~3 ms.
INLINE_COUNT_CHARS: Final = 65536


class MeterFlag(StrEnum):
    """Why a charge rests on something other than a plain report or exact count."""

    REPORT_REJECTED = "report_rejected"  # the upstream's usage was implausible
    COUNT_FAILED = "count_failed"  # the tokenizer failed: UTF-8 byte bound
    BOUNDED = "bounded"  # too large to count on the loop: UTF-8 byte bound


@record
class Metered:
    usage: Usage
    source: UsageSource
    flags: frozenset[MeterFlag] = frozenset()


@record
class Reply:
    """What the client received of the reply: text and (name, arguments) tool calls."""

    text: str = ""
    tool_calls: tuple[tuple[str, str], ...] = ()

    @property
    def chars(self) -> int:
        return len(self.text) + sum(len(n) + len(a) for n, a in self.tool_calls)

    @property
    def floor(self) -> int:
        """Fewest completion tokens a report may claim: one per relayed piece of text."""
        if not self.tool_calls:
            return 1 if self.text else 0
        return int(bool(self.text)) + sum(1 for _, args in self.tool_calls if args)


def request_size(body: Mapping[str, Any]) -> int:
    """Characters that bound the request's text (its JSON length)."""
    try:
        return len(orjson.dumps(body))
    except (TypeError, orjson.JSONEncodeError):
        return INLINE_COUNT_CHARS + 1  # cannot tell: treat as large


def estimate(
    request_body: Mapping[str, Any],
    reply: Reply,
    enc: tiktoken.Encoding,
    *,
    size: int | None = None,
    flags: frozenset[MeterFlag] = frozenset(),
    inline: bool = True,
    fmt: WireFormat | None = None,
) -> Metered:
    """The estimate of a request; `size` is the request body's length in bytes.
    `fmt`: the endpoint's wire format (proxy.billing.wire_formats; None: chat).

    With `inline`, inputs over INLINE_COUNT_CHARS are bounded instead of counted.
    """
    total = (request_size(request_body) if size is None else size) + reply.chars
    counter = TokenCounter(enc if not inline or total <= INLINE_COUNT_CHARS else None)
    count_prompt = count_chat_prompt if fmt is None else fmt.count_prompt
    # Capped like reported counts (only a body far over server.max_body_bytes could
    # reach MAX_TOKENS), so that every event stays within the contract's bounds.
    usage = Usage(
        prompt_tokens=min(count_prompt(counter, request_body), MAX_TOKENS),
        completion_tokens=min(count_completion(counter, reply.text, reply.tool_calls), MAX_TOKENS),
    )
    if counter.bounded:
        flags |= {MeterFlag.BOUNDED}
    if counter.failed:
        flags |= {MeterFlag.COUNT_FAILED}
    return Metered(usage, UsageSource.ESTIMATED, flags)


async def estimate_off_loop(
    metered: Metered,
    request_body: Mapping[str, Any],
    reply: Reply,
    enc: tiktoken.Encoding,
    fmt: WireFormat | None = None,
) -> Metered:
    """Refine a BOUNDED estimate by counting in a worker thread (tiktoken releases
    the GIL while it encodes). The caller keeps `metered` if this is cancelled."""
    if MeterFlag.BOUNDED not in metered.flags:
        return metered
    flags = metered.flags - {MeterFlag.BOUNDED}
    exact = await asyncio.to_thread(
        estimate, request_body, reply, enc, size=0, flags=flags, inline=False, fmt=fmt
    )
    # A count is never allowed to exceed the bound it refines (it cannot, but a
    # charge must not grow because a thread said so).
    if exact.usage.total_tokens > metered.usage.total_tokens:
        return metered
    return exact


def accept_report(report: UsageReport | None, floor: int) -> Metered | None:
    """The report as the charge's usage when it is plausible (valid, and at least
    `floor` completion tokens: one per non-empty piece of text relayed); else None."""
    if report is not None and report.usage is not None and report.usage.completion_tokens >= floor:
        return Metered(report.usage, UsageSource.UPSTREAM)
    return None


def rejected(report: UsageReport | None) -> frozenset[MeterFlag]:
    """The flags of an estimate made although a report was there."""
    return frozenset({MeterFlag.REPORT_REJECTED}) if report is not None else frozenset()


def meter_json(
    body: bytes,
    request_body: Mapping[str, Any],
    enc: tiktoken.Encoding,
    size: int | None = None,
    fmt: WireFormat | None = None,
) -> Metered:
    """Usage of a non-streaming response body; estimated when the body has none."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        return estimate(request_body, Reply(), enc, size=size, fmt=fmt)
    report = find_report(obj) if fmt is None else fmt.find_report(obj)
    reply = message_reply(obj) if fmt is None else fmt.json_reply(obj)
    accepted = accept_report(report, reply.floor)
    if accepted is not None:
        return accepted
    return estimate(request_body, reply, enc, size=size, flags=rejected(report), fmt=fmt)


def estimate_prompt_only(
    request_body: Mapping[str, Any],
    enc: tiktoken.Encoding,
    size: int | None = None,
    fmt: WireFormat | None = None,
) -> Metered:
    """Nothing was relayed (e.g. upstream died before the first chunk after we
    started the response): only the prompt was consumed."""
    return estimate(request_body, Reply(), enc, size=size, fmt=fmt)


def with_flags(metered: Metered, *flags: MeterFlag) -> Metered:
    return replace(metered, flags=metered.flags | frozenset(flags))


# -- what the client received -------------------------------------------------------


def stream_reply(events: Iterable[Mapping[str, Any]]) -> Reply:
    """Text and tool-call name/argument fragments of decoded stream chunks."""
    texts: list[str] = []
    # Streamed tool calls arrive as fragments keyed by (choice, call index); they
    # are joined per call first because BPE counts of pieces differ from the whole.
    calls: dict[tuple[Any, Any], list[str]] = {}
    for obj in events:
        for choice in choices_of(obj):
            delta = choice.get("delta")
            if not isinstance(delta, MAPPING):
                continue
            _texts(delta, texts)
            legacy = delta.get("function_call")  # the pre-tools API, still served
            if isinstance(legacy, Mapping):
                _add_fragment(calls, (choice.get("index"), "function_call"), legacy)
            fragments = delta.get("tool_calls")
            for frag in fragments if isinstance(fragments, list) else ():
                fn = frag.get("function") if isinstance(frag, Mapping) else None
                if isinstance(fn, Mapping):
                    _add_fragment(calls, (choice.get("index"), frag.get("index")), fn)
    return Reply("".join(texts), tuple((name, args) for name, args in calls.values()))


def completion_parts(
    events: Iterable[Mapping[str, Any]],
) -> tuple[str, list[tuple[str, str]]]:
    """Text and tool calls the client received (tests and tools read it this way)."""
    reply = stream_reply(events)
    return reply.text, list(reply.tool_calls)


# Message keys that carry nothing `message_reply` counts (besides `content`).
_PLAIN_MESSAGE_KEYS: Final = frozenset({"role", "content", "refusal", "annotations"})
_EMPTY_REPLY: Final = Reply()


def message_reply(obj: Mapping[str, Any]) -> Reply:
    """Text and tool calls of a non-streaming body's choices."""
    choices = obj.get("choices")
    if type(choices) is list and len(choices) == 1:
        plain = _plain_message(choices[0])  # one text choice: the common reply
        if plain is not None:
            return plain
    return _message_reply(obj)


def _plain_message(choice: Any) -> Reply | None:
    """`_message_reply` of a body whose only choice is this one, when its message is
    plain text (no refusal, tool or audio part); None for anything else."""
    if type(choice) is not dict:
        return None
    message = choice.get("message")
    if type(message) is not dict or not _PLAIN_MESSAGE_KEYS.issuperset(message):
        return None
    if message.get("refusal") is not None:
        return None
    content = message.get("content")
    if type(content) is not str:
        return None if content is not None else _EMPTY_REPLY
    return Reply(content) if content else _EMPTY_REPLY


def _message_reply(obj: Mapping[str, Any]) -> Reply:
    texts: list[str] = []
    tools: list[tuple[str, str]] = []
    for choice in choices_of(obj):
        message = choice.get("message")
        if not isinstance(message, MAPPING):
            continue
        _texts(message, texts)
        legacy = message.get("function_call")
        if isinstance(legacy, Mapping):
            tools.append((_str(legacy.get("name")), _str(legacy.get("arguments"))))
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(fn, Mapping):
                tools.append((_str(fn.get("name")), _str(fn.get("arguments"))))
    return Reply("".join(texts), tuple(tools))


def _texts(part: Mapping[str, Any], out: list[str]) -> None:
    for key in ("content", "refusal", "reasoning_content", "reasoning"):
        value = part.get(key)
        if isinstance(value, str):
            out.append(value)
    audio = part.get("audio")  # audio replies: the transcript is what we can count
    if isinstance(audio, Mapping) and isinstance(audio.get("transcript"), str):
        out.append(audio["transcript"])


def _add_fragment(
    calls: dict[tuple[Any, Any], list[str]], key: tuple[Any, Any], fn: Mapping[str, Any]
) -> None:
    parts = calls.setdefault(key, ["", ""])
    parts[0] += _str(fn.get("name"))
    parts[1] += _str(fn.get("arguments"))


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""
