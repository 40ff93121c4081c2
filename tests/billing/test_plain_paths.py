"""The fast paths for the common reply (a plain usage report, one text choice) give
exactly what the general paths give, over generated odd inputs too."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.billing import metering, usage_report
from proxy.billing.metering import Reply, message_reply
from proxy.billing.usage_report import CHAT_USAGE, RESPONSES_USAGE, find_report, normalise
from proxy.contract.charge_event import MAX_TOKENS
from proxy.contract.usage import Usage

# Counts as providers send them, and as they should not: bools, floats (NaN, inf,
# fractions), negatives, zero, the bound and past it, huge ints, strings, objects.
COUNT = st.one_of(
    st.integers(0, 50_000),
    st.sampled_from([0, 1, MAX_TOKENS - 1, MAX_TOKENS, MAX_TOKENS + 1, 2**63, 10**30, -1]),
    st.integers(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.text(max_size=3),
    st.just({}),
    st.just([1]),
)
MAYBE = st.one_of(st.just(None), COUNT)  # None here: the key is left out


def _object(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


PROMPT_DETAILS = st.one_of(
    _object(
        {
            "cached_tokens": COUNT,
            "audio_tokens": COUNT,
            "cache_write_tokens": COUNT,
            "cache_creation_tokens": COUNT,
            "text_tokens": COUNT,
        }
    ),
    st.none(),
    st.integers(),
    st.just([]),
)
COMPLETION_DETAILS = st.one_of(
    _object(
        {
            "reasoning_tokens": COUNT,
            "audio_tokens": COUNT,
            "accepted_prediction_tokens": COUNT,
        }
    ),
    st.none(),
    st.text(max_size=2),
)
REPORT = _object(
    {
        "prompt_tokens": COUNT,
        "completion_tokens": COUNT,
        "total_tokens": COUNT,
        "prompt_tokens_details": PROMPT_DETAILS,
        "completion_tokens_details": COMPLETION_DETAILS,
        "prompt_cache_hit_tokens": COUNT,
        "cached_tokens": COUNT,
        "cache_creation_input_tokens": COUNT,
        "input_tokens": COUNT,
    }
)
# Mostly plain reports, so that the fast path is taken often.
PLAIN_REPORT = st.builds(
    lambda p, c, t, pd, cd: {
        k: v
        for k, v in {
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": t,
            "prompt_tokens_details": pd,
            "completion_tokens_details": cd,
        }.items()
        if v is not ...
    },
    st.integers(-2, 2 * MAX_TOKENS),
    st.integers(-2, 2 * MAX_TOKENS),
    st.one_of(st.just(...), st.none(), st.integers(-2, 3 * MAX_TOKENS)),
    st.one_of(
        st.just(...),
        st.none(),
        _object({"cached_tokens": st.integers(-1, 10**9 + 1), "audio_tokens": st.integers(-1, 2)}),
    ),
    st.one_of(
        st.just(...),
        st.none(),
        _object(
            {"reasoning_tokens": st.integers(-1, 10**9 + 1), "audio_tokens": st.integers(-1, 2)}
        ),
    ),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(REPORT, PLAIN_REPORT))
def test_plain_report_path_equals_the_general_path(raw: dict[str, Any]) -> None:
    general = usage_report._normalise(raw, CHAT_USAGE)
    plain = usage_report._plain_chat(raw)
    if plain is not None:  # taken only where it is exact
        assert plain == general
        assert type(plain) is Usage
    assert normalise(raw) == general
    # Other formats never take the chat path.
    assert normalise(raw, RESPONSES_USAGE) == usage_report._normalise(raw, RESPONSES_USAGE)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(REPORT, PLAIN_REPORT), st.one_of(st.none(), st.just("x")))
def test_find_report_takes_the_same_row(raw: dict[str, Any], groq: str | None) -> None:
    body: dict[str, Any] = {"usage": raw}
    if groq:
        body["x_groq"] = {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    report = find_report(body)
    assert report is not None and report.where == "openai"
    assert report.usage == usage_report._normalise(raw, CHAT_USAGE)
    # `usage: null` is no report: the next location is read, as before.
    body["usage"] = None
    found = find_report(body)
    assert (found is not None and found.where == "groq") if groq else found is None


def test_plain_path_is_taken_for_the_common_reports() -> None:
    plain = [
        {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
        {
            "prompt_tokens": 12,
            "completion_tokens": 7,
            "total_tokens": 19,
            "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 3,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 30},  # Gemini
    ]
    expected = [Usage(12, 7), Usage(12, 7, 4, 3), Usage(12, 18, 0, 11)]
    for raw, usage in zip(plain, expected, strict=True):
        assert usage_report._plain_chat(raw) == usage == normalise(raw)
    # Not plain: handed to the general path (floats, DeepSeek's hits, audio, writes).
    for raw in [
        {"prompt_tokens": 12.0, "completion_tokens": 7},
        {"prompt_tokens": 12, "completion_tokens": 7, "prompt_cache_hit_tokens": 2},
        {"prompt_tokens": 12, "completion_tokens": 7, "prompt_tokens_details": {"audio_tokens": 2}},
        {"prompt_tokens": 12, "completion_tokens": True},
        {"prompt_tokens": 0, "completion_tokens": 7},
    ]:
        assert usage_report._plain_chat(raw) is None


TEXT = st.one_of(st.none(), st.text(max_size=5), st.integers(), st.just([{"type": "text"}]))
MESSAGE = st.one_of(
    _object(
        {
            "role": st.just("assistant"),
            "content": TEXT,
            "refusal": TEXT,
            "annotations": st.just([]),
            "reasoning_content": TEXT,
            "audio": st.one_of(st.none(), st.fixed_dictionaries({"transcript": TEXT})),
            "tool_calls": st.one_of(
                st.none(),
                st.just([{"function": {"name": "f", "arguments": "{}"}}]),
            ),
            "function_call": st.one_of(st.none(), st.just({"name": "g", "arguments": "1"})),
        }
    ),
    st.none(),
    st.text(max_size=2),
)
CHOICE = st.one_of(_object({"index": st.just(0), "message": MESSAGE}), st.none(), st.integers())


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(CHOICE, max_size=3), CHOICE, st.none()))
def test_plain_message_path_equals_the_general_path(choices: Any) -> None:
    body = {"id": "x", "choices": choices}
    general = metering._message_reply(body)
    assert message_reply(body) == general
    if isinstance(choices, list) and len(choices) == 1:
        plain = metering._plain_message(choices[0])
        if plain is not None:
            assert plain == general
            assert type(plain) is Reply
            assert plain.floor == general.floor and plain.chars == general.chars
