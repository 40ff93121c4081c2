"""Cache-write and audio counts read from provider usage reports (issue 16)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.billing.usage_report import normalise as usage_from_report
from proxy.contract.usage import Usage


def report(**extra: Any) -> dict[str, Any]:
    return {"prompt_tokens": 100, "completion_tokens": 50, **extra}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (report(), Usage(100, 50)),
        (
            report(prompt_tokens_details={"cache_write_tokens": 30}),
            Usage(100, 50, cache_write_tokens=30),
        ),
        (
            report(prompt_tokens_details={"cache_creation_input_tokens": 20}),
            Usage(100, 50, cache_write_tokens=20),
        ),
        (report(cache_creation_input_tokens=15), Usage(100, 50, cache_write_tokens=15)),
        (
            report(
                prompt_tokens_details={"audio_tokens": 60, "cached_tokens": 10},
                completion_tokens_details={"audio_tokens": 40, "reasoning_tokens": 5},
            ),
            Usage(
                100,
                50,
                cached_tokens=10,
                reasoning_tokens=5,
                audio_prompt_tokens=60,
                audio_completion_tokens=40,
            ),
        ),
        # Overlapping parts: the dearer one first (audio, then cache writes, then cached).
        (
            report(
                prompt_tokens_details={
                    "audio_tokens": 70,
                    "cache_write_tokens": 20,
                    "cached_tokens": 50,
                }
            ),
            Usage(100, 50, cached_tokens=10, cache_write_tokens=20, audio_prompt_tokens=70),
        ),
        (
            report(completion_tokens_details={"audio_tokens": 45, "reasoning_tokens": 30}),
            Usage(100, 50, reasoning_tokens=5, audio_completion_tokens=45),
        ),
        # More audio than prompt is clamped to the prompt, never beyond it.
        (
            report(prompt_tokens_details={"audio_tokens": 500}),
            Usage(100, 50, audio_prompt_tokens=100),
        ),
        # Counts that are not numbers are ignored, like missing ones.
        (
            report(prompt_tokens_details={"audio_tokens": "9", "cache_write_tokens": True}),
            Usage(100, 50),
        ),
        (report(prompt_tokens_details={"audio_tokens": -3}), Usage(100, 50)),
    ],
)
def test_priced_parts_are_read_and_kept_disjoint(raw: dict[str, Any], expected: Usage) -> None:
    assert usage_from_report(raw) == expected
