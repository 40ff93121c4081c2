"""The one usage normaliser: a provider's usage report (wherever it hides) → Usage.

Table-driven: `LOCATIONS` says where a report may be (first match wins, OpenAI's
place first) and `PROMPT`/`COMPLETION`/`CACHED`/`REASONING` where each count may be
inside it. Every count is validated: a non-negative integer up to MAX_TOKENS; a
float is rounded up (never down); strings, booleans, objects, NaN, negatives and
oversized values make the whole report implausible. An implausible report is
replaced by the estimate (proxy.billing.metering) and flagged.

| provider | where | what differs |
|---|---|---|
| OpenAI (and most compatibles) | `usage` | the reference |
| Groq | `x_groq.usage` (streams) | location |
| Moonshot (streams) | `choices[0].usage` | location; `cached_tokens` at the report's top level |
| DeepSeek | `usage` | `prompt_cache_hit_tokens` (cache hits, part of `prompt_tokens`) |
| Gemini (OpenAI-compatible) | `usage` | thinking is in `total_tokens`, not `completion_tokens` |
| LiteLLM, other gateways | `usage` on a chunk that still has choices | where in the stream |

Gemini's rule is applied to everyone: when `total_tokens` exceeds prompt +
completion, the excess is hidden reasoning, so completion = total - prompt and
reasoning grows by the excess (OpenAI's semantics: reasoning ⊆ completion).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from proxy.billing.usage_parts import with_priced_parts
from proxy.contract.charge_event import MAX_TOKENS
from proxy.contract.records import record
from proxy.contract.usage import Usage

Path = tuple[str | int, ...]

LOCATIONS: Final[tuple[tuple[str, Path], ...]] = (
    ("openai", ("usage",)),
    ("groq", ("x_groq", "usage")),
    ("moonshot", ("choices", 0, "usage")),
)
PROMPT: Final[tuple[Path, ...]] = (("prompt_tokens",),)
COMPLETION: Final[tuple[Path, ...]] = (("completion_tokens",),)
TOTAL: Final[tuple[Path, ...]] = (("total_tokens",),)
CACHED: Final[tuple[Path, ...]] = (
    ("prompt_tokens_details", "cached_tokens"),
    ("prompt_cache_hit_tokens",),  # DeepSeek
    ("cached_tokens",),  # Moonshot
)
REASONING: Final[tuple[Path, ...]] = (("completion_tokens_details", "reasoning_tokens"),)


@dataclass(frozen=True, slots=True)
class UsageFields:
    """Where one wire format keeps its report and each count in it (a row per API:
    chat.completions and legacy completions share OpenAI's chat names; the
    Responses API says input/output; embeddings report a prompt only)."""

    locations: tuple[tuple[str, Path], ...]
    prompt: tuple[Path, ...]
    completion: tuple[Path, ...]
    total: tuple[Path, ...]
    cached: tuple[Path, ...]
    reasoning: tuple[Path, ...]
    prompt_details: str  # the object holding cache-write/audio parts (usage_parts)
    completion_details: str
    # Embeddings: a report has no completion at all (0, never derived from a total).
    prompt_only: bool = False


CHAT_USAGE: Final = UsageFields(
    LOCATIONS,
    PROMPT,
    COMPLETION,
    TOTAL,
    CACHED,
    REASONING,
    "prompt_tokens_details",
    "completion_tokens_details",
)
# The Responses API: the body's `usage`, or the `response` object of the terminal
# stream events (`response.completed`, `.incomplete`, `.failed`).
RESPONSES_USAGE: Final = UsageFields(
    (("openai", ("usage",)), ("responses_event", ("response", "usage"))),
    (("input_tokens",),),
    (("output_tokens",),),
    TOTAL,
    (("input_tokens_details", "cached_tokens"),),
    (("output_tokens_details", "reasoning_tokens"),),
    "input_tokens_details",
    "output_tokens_details",
)
EMBEDDINGS_USAGE: Final = UsageFields(
    (("openai", ("usage",)),),
    PROMPT,
    (),
    (),
    (),
    (),
    "prompt_tokens_details",
    "completion_tokens_details",
    prompt_only=True,
)

_ABSENT: Final = object()
# isinstance(x, (dict, Mapping)): a dict (what orjson decodes to) passes on its exact
# type, ~4x faster than through the ABC's __instancecheck__ alone.
MAPPING: Final = (dict, Mapping)


class _Implausible(Exception):
    pass


@record
class UsageReport:
    """A report found in a response; `usage` is None when it was implausible."""

    usage: Usage | None
    where: str  # the LOCATIONS row it was found at

    @property
    def valid(self) -> bool:
        return self.usage is not None


def choices_of(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The choice objects of a chunk or body, whatever shape `choices` has: a list, a
    single choice object, or an object of choices keyed by index."""
    choices = obj.get("choices")
    if isinstance(choices, list):
        return [c for c in choices if isinstance(c, MAPPING)]
    if isinstance(choices, Mapping):
        if any(k in choices for k in ("delta", "message", "index", "finish_reason")):
            return [choices]
        return [c for c in choices.values() if isinstance(c, Mapping)]
    return []


def find_report(obj: Mapping[str, Any], fields: UsageFields = CHAT_USAGE) -> UsageReport | None:
    """The usage report of a decoded chunk or body; None when it has none at all."""
    if type(obj) is dict:
        raw = obj.get("usage")
        if type(raw) is dict and fields.locations[0] == ("openai", ("usage",)):
            # The first location of every format, as a plain lookup: the same row wins.
            return UsageReport(normalise(raw, fields), "openai")
    for where, path in fields.locations:
        raw = _at_location(obj, path)
        if raw is _ABSENT or raw is None:
            continue
        return UsageReport(normalise(raw, fields), where)
    return None


def has_report(obj: Mapping[str, Any]) -> bool:
    return find_report(obj) is not None


def normalise(raw: Any, fields: UsageFields = CHAT_USAGE) -> Usage | None:
    """One report object → Usage, or None when it is implausible."""
    if fields is CHAT_USAGE and type(raw) is dict:
        plain = _plain_chat(raw)  # the common report, ~3x cheaper (same result)
        if plain is not None:
            return plain
    return _normalise(raw, fields)


def _normalise(raw: Any, fields: UsageFields) -> Usage | None:
    """`normalise` for any report: the general, table-driven path."""
    if not isinstance(raw, MAPPING):
        return None
    try:
        prompt = _first(raw, fields.prompt)
        completion = _first(raw, fields.completion)
        total = _first(raw, fields.total)
        cached = _first(raw, fields.cached)
        reasoning = _first(raw, fields.reasoning)
    except _Implausible:
        return None
    if prompt is None or prompt == 0:
        return None  # every request has a prompt (an input): a report without one is wrong
    if fields.prompt_only:
        completion = 0
    if completion is None:
        if total is None or total < prompt:
            return None
        completion = total - prompt
    reasoning = reasoning or 0
    if total is not None and total > prompt + completion:
        hidden = total - prompt - completion  # Gemini: thinking is outside completion
        completion += hidden
        reasoning += hidden
    if completion > MAX_TOKENS:
        return None
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=min(cached or 0, prompt),
        reasoning_tokens=min(reasoning, completion),
    )
    # Cache writes and audio: priced parts of the same report (proxy.billing.usage_parts).
    return with_priced_parts(
        usage, raw, raw.get(fields.prompt_details), raw.get(fields.completion_details)
    )


# Keys of a chat report that the plain path does not read: any of them sends the
# report through the general path (they change cached or priced parts).
_NOT_PLAIN_TOP: Final = ("prompt_cache_hit_tokens", "cached_tokens", "cache_creation_input_tokens")
_NOT_PLAIN_PROMPT: Final = (
    "cache_write_tokens",
    "cache_creation_tokens",
    "cache_creation_input_tokens",
)


def _plain_chat(raw: dict[str, Any]) -> Usage | None:
    """`normalise(raw)` for the common chat report (exact non-negative integers in
    range, a positive prompt, at most cached/reasoning details and zero audio), in a
    few lookups; None when `raw` is anything else (then the general path decides,
    tests/billing/test_usage_report.py checks both agree). Never None for a report
    that is plain: a plain report is always plausible."""
    prompt = raw.get("prompt_tokens")
    completion = raw.get("completion_tokens")
    total = raw.get("total_tokens")
    if type(prompt) is not int or type(completion) is not int:
        return None
    if not (0 < prompt <= MAX_TOKENS and 0 <= completion <= MAX_TOKENS):
        return None
    if total is not None and (type(total) is not int or not 0 <= total <= MAX_TOKENS):
        return None
    for key in _NOT_PLAIN_TOP:
        if key in raw:
            return None
    pd = raw.get("prompt_tokens_details")
    if type(pd) is dict and any(key in pd for key in _NOT_PLAIN_PROMPT):
        return None
    cached = _plain_detail(pd, "cached_tokens")
    reasoning = _plain_detail(raw.get("completion_tokens_details"), "reasoning_tokens")
    if cached < 0 or reasoning < 0:
        return None
    if total is not None and total > prompt + completion:
        hidden = total - prompt - completion  # Gemini, as in `normalise`
        completion += hidden  # <= total - prompt < MAX_TOKENS
        reasoning += hidden
    return Usage(
        prompt, completion, cached if cached < prompt else prompt, min(reasoning, completion)
    )


def _plain_detail(details: Any, key: str) -> int:
    """The `key` count of a plain report's details object (0 when there is none);
    -1 when the details are not plain (not an object, audio tokens, an odd count)."""
    if details is None:
        return 0
    if type(details) is not dict:
        return -1
    audio = details.get("audio_tokens")
    if audio is not None and (type(audio) is not int or audio > 0):
        return -1
    value = details.get(key)
    if value is None:
        return 0
    return value if type(value) is int and 0 <= value <= MAX_TOKENS else -1


def _at_location(obj: Any, path: Path) -> Any:
    for step in path:
        if isinstance(step, int):  # an index into the list `choices` became
            if not isinstance(obj, list) or len(obj) <= step:
                return _ABSENT
            obj = obj[step]
        elif not isinstance(obj, MAPPING) or step not in obj:
            return _ABSENT
        elif step == "choices":
            obj = choices_of(obj)
        else:
            obj = obj[step]
    return obj


def _first(raw: Mapping[str, Any], paths: Sequence[Path]) -> int | None:
    """The first count present at one of `paths` (None when none is)."""
    for path in paths:
        if len(path) == 1 and type(raw) is dict:  # a top-level count: a plain lookup
            value = raw.get(path[0])
        else:
            value = _at_location(raw, path)
        if value is _ABSENT or value is None:
            continue
        return _tokens_value(value)
    return None


def _tokens_value(value: Any) -> int:
    """A validated count: integers as they are, floats rounded up, all else refused."""
    if isinstance(value, bool):
        raise _Implausible
    if isinstance(value, int):
        count = value
    elif isinstance(value, float) and math.isfinite(value) and value >= 0:
        count = math.ceil(value)
    else:
        raise _Implausible
    if count < 0 or count > MAX_TOKENS:
        raise _Implausible
    return count
