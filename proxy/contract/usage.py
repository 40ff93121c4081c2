"""Token usage: plain values shared by metering, pricing and events."""

from __future__ import annotations

from enum import StrEnum

from proxy.contract.records import record


class UsageSource(StrEnum):
    UPSTREAM = "upstream"  # the provider's own usage report
    ESTIMATED = "estimated"  # counted locally with the alias's tokenizer


@record
class Usage:
    """Token counts in OpenAI's sense.

    `cached_tokens` is the part of `prompt_tokens` served from the provider's
    prompt cache and `reasoning_tokens` the part of `completion_tokens` spent on
    hidden reasoning, exactly as OpenAI reports them (both are subsets).
    `cache_write_tokens` (prompt tokens written to the cache, for providers that
    report them) and `audio_prompt_tokens` are further parts of the prompt,
    `audio_completion_tokens` of the completion; metering keeps the prompt's
    parts disjoint (cached + cache_write + audio_prompt <= prompt) and the
    completion's too (reasoning + audio_completion <= completion).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    audio_prompt_tokens: int = 0
    audio_completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
