"""The stream meter on the other endpoints' streams: a Responses stream's usage is
found in its (long) `response.completed` event by the byte scan of the tail, the
same whatever the read boundaries; without it, the relayed deltas are counted."""

from __future__ import annotations

from itertools import pairwise

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.billing.counting import TokenCounter
from proxy.billing.encodings import EncodingRegistry
from proxy.billing.endpoint_tokens import count_responses_input
from proxy.billing.tokens import count_text
from proxy.billing.wire_formats import COMPLETIONS, RESPONSES
from proxy.contract.usage import Usage, UsageSource
from proxy.upstream import sse
from proxy.upstream.stream_meter import StreamMeter, meter_stream

ENC = EncodingRegistry()
REQUEST = {"model": "m", "input": "tell me about figs"}
USAGE = {
    "input_tokens": 12,
    "output_tokens": 900,
    "total_tokens": 912,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens_details": {"reasoning_tokens": 0},
}


def event(obj: dict) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def responses_stream(words: list[str], usage: dict | None) -> bytes:
    base = {
        "id": "resp_1",
        "object": "response",
        "status": "in_progress",
        "output": [],
        "usage": None,
    }
    out = [event({"type": "response.created", "response": base})]
    out += [
        event({"type": "response.output_text.delta", "output_index": 0, "delta": w}) for w in words
    ]
    item = {"type": "message", "content": [{"type": "output_text", "text": "".join(words)}]}
    done = {**base, "status": "completed", "output": [item], "usage": usage}
    out.append(event({"type": "response.completed", "response": done}))
    return b"".join(out)


def run(data: bytes, cuts: list[int], fmt=RESPONSES, strip: bool = False):
    meter = StreamMeter(strip_usage=strip, fmt=fmt)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    relayed = b"".join(meter.relay(data[a:b]) for a, b in pairwise(points))
    relayed += meter.unterminated()
    return meter, relayed


def test_a_long_completed_event_is_found_by_the_tail_scan() -> None:
    words = [" fig"] * 3000  # the completed event repeats ~12 KB of text
    data = responses_stream(words, USAGE)
    meter, relayed = run(data, list(range(0, len(data), 1000)))
    assert relayed == data
    report = meter.report()  # the pass-through scan, no decoding of every event
    assert report is not None and report.usage == Usage(12, 900)
    metered = meter_stream(meter, REQUEST, ENC.get("o200k_base"))
    assert metered.source is UsageSource.UPSTREAM and metered.usage == Usage(12, 900)


@settings(max_examples=80, deadline=None)
@given(
    words=st.lists(st.sampled_from([" fig", " é", "🙂", "\\n", ' "q"']), min_size=1, max_size=40),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    with_usage=st.booleans(),
)
def test_any_read_boundaries_meter_the_same(words, cuts, with_usage) -> None:
    enc = ENC.get("o200k_base")
    data = responses_stream(words, USAGE if with_usage else None)
    meter, relayed = run(data, cuts)
    assert relayed == data  # byte-faithful
    metered = meter_stream(meter, REQUEST, enc)
    if with_usage:
        assert metered.source is UsageSource.UPSTREAM and metered.usage == Usage(12, 900)
    else:
        assert metered.source is UsageSource.ESTIMATED
        assert metered.usage.completion_tokens == count_text(enc, "".join(words))
        assert metered.usage.prompt_tokens == count_responses_input(TokenCounter(enc), REQUEST)


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.sampled_from([" fig", " box"]), min_size=2, max_size=30),
    cut=st.integers(0, 10_000),
)
def test_a_cut_off_stream_is_charged_at_least_what_was_relayed(words, cut) -> None:
    enc = ENC.get("o200k_base")
    data = responses_stream(words, USAGE)
    data = data[: cut % len(data)]
    meter, relayed = run(data, [])
    metered = meter_stream(meter, REQUEST, enc)
    got = "".join(
        o.get("delta", "")
        for o in sse.iter_event_objects(relayed)
        if o.get("type") == "response.output_text.delta"
    )
    if metered.source is UsageSource.ESTIMATED:
        assert metered.usage.completion_tokens >= count_text(enc, got)
    assert metered.usage.prompt_tokens >= 1


def test_completions_stream_usage_asked_for_is_removed() -> None:
    chunks = [
        {
            "id": "c",
            "object": "text_completion",
            "choices": [{"text": t, "index": 0}],
            "usage": None,
        }
        for t in ("a", " b")
    ]
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    body = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
    body += b"data: " + orjson.dumps({"id": "c", "choices": [], "usage": usage}) + b"\n\n"
    body += b"data: [DONE]\n\n"
    meter, relayed = run(body, [7, 60], fmt=COMPLETIONS, strip=True)
    assert b'"usage"' not in relayed and relayed.endswith(b"data: [DONE]\n\n")
    metered = meter_stream(meter, {"prompt": "x"}, ENC.get("o200k_base"))
    assert metered.usage == Usage(3, 2) and metered.source is UsageSource.UPSTREAM
