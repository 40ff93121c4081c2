"""The priced parts of a usage report beyond OpenAI's cached/reasoning counts:
prompt tokens written to the provider's cache, and audio tokens in and out.

Separate from proxy.billing.metering, which reads the base counts and hands the
report's details here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from proxy.contract.usage import Usage

# Where OpenAI-compatible providers report prompt tokens written to their cache.
_CACHE_WRITE_DETAILS = (
    "cache_write_tokens",
    "cache_creation_tokens",
    "cache_creation_input_tokens",
)


def with_priced_parts(
    usage: Usage, report: Mapping[str, Any], pdetails: Any, cdetails: Any
) -> Usage:
    """`usage` with its cache-write and audio counts, the parts kept disjoint.

    The dearer part is counted first when a report's parts overlap: audio, then
    cache writes, then cached tokens (a cached token must not make audio cheap).
    A count that is not a number is ignored, like a missing one.
    """
    pd = _mapping(pdetails)
    cd = _mapping(cdetails)
    write = next((v for k in _CACHE_WRITE_DETAILS if (v := _part(pd.get(k)))), 0) if pd else 0
    write = write or _part(report.get("cache_creation_input_tokens"))
    audio_in = _part(pd.get("audio_tokens")) if pd else 0
    audio_out = _part(cd.get("audio_tokens")) if cd else 0
    if not (write or audio_in or audio_out):
        return usage
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    audio_in = min(audio_in, prompt)
    write = min(write, prompt - audio_in)
    audio_out = min(audio_out, completion)
    return replace(
        usage,
        audio_prompt_tokens=audio_in,
        cache_write_tokens=write,
        cached_tokens=min(usage.cached_tokens, prompt - audio_in - write),
        audio_completion_tokens=audio_out,
        reasoning_tokens=min(usage.reasoning_tokens, completion - audio_out),
    )


_EMPTY: Mapping[str, Any] = {}


def _mapping(value: Any) -> Mapping[str, Any]:
    """`value` when it is an object, else empty (a dict or None without the ABC check)."""
    if type(value) is dict:
        return value
    if value is None or not isinstance(value, Mapping):
        return _EMPTY
    return value


def _part(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
