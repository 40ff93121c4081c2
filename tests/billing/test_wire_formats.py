"""The per-endpoint metering pieces: usage fields, local counts and reply readers of
the Responses API, embeddings and legacy completions."""

from __future__ import annotations

import orjson
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.billing.counting import TokenCounter
from proxy.billing.encodings import EncodingRegistry
from proxy.billing.endpoint_replies import (
    completions_reply,
    completions_stream_reply,
    responses_reply,
    responses_stream_reply,
)
from proxy.billing.endpoint_tokens import count_responses_input, count_text_input
from proxy.billing.metering import meter_json
from proxy.billing.tokens import count_chat_prompt, count_text
from proxy.billing.usage_report import EMBEDDINGS_USAGE, RESPONSES_USAGE, normalise
from proxy.billing.wire_formats import EMBEDDINGS, FORMATS, RESPONSES
from proxy.contract.charge_event import ENDPOINTS
from proxy.contract.usage import Usage, UsageSource

RESPONSES_OK = {
    "input_tokens": 10,
    "input_tokens_details": {"cached_tokens": 4},
    "output_tokens": 7,
    "output_tokens_details": {"reasoning_tokens": 3},
    "total_tokens": 17,
}


ENC = EncodingRegistry()


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return ENC.get("o200k_base")


def test_every_endpoint_has_a_format() -> None:
    assert set(FORMATS) == set(ENDPOINTS)


def test_responses_usage_fields() -> None:
    assert normalise(RESPONSES_OK, RESPONSES_USAGE) == Usage(10, 7, 4, 3)
    assert normalise({**RESPONSES_OK, "output_tokens": "7"}, RESPONSES_USAGE) is None
    assert normalise({"prompt_tokens": 10, "completion_tokens": 2}, RESPONSES_USAGE) is None
    event = {"type": "response.completed", "response": {"usage": RESPONSES_OK}}
    report = RESPONSES.find_report(event)
    assert report is not None and report.usage == Usage(10, 7, 4, 3)
    assert RESPONSES.find_report({"type": "response.created", "response": {"usage": None}}) is None


def test_embeddings_usage_is_prompt_only() -> None:
    assert normalise({"prompt_tokens": 8, "total_tokens": 8}, EMBEDDINGS_USAGE) == Usage(8, 0)
    assert normalise({"prompt_tokens": 8, "total_tokens": 80}, EMBEDDINGS_USAGE) == Usage(8, 0)
    assert normalise({"prompt_tokens": 8}, EMBEDDINGS_USAGE) == Usage(8, 0)
    assert normalise({"total_tokens": 8}, EMBEDDINGS_USAGE) is None
    assert normalise({"prompt_tokens": -8}, EMBEDDINGS_USAGE) is None


def test_text_inputs(enc: tiktoken.Encoding) -> None:
    c = TokenCounter(enc)
    assert count_text_input(c, "hello world") == count_text(enc, "hello world")
    assert count_text_input(c, ["a b", "c"]) == count_text(enc, "a b") + count_text(enc, "c")
    assert count_text_input(c, [1, 2, 3]) == 3  # a token array: its length
    assert count_text_input(c, [[1, 2], [3]]) == 3
    assert count_text_input(c, None) == 0


def test_responses_input_counts_like_the_chat_it_stands_for(enc: tiktoken.Encoding) -> None:
    c = TokenCounter(enc)
    body = {"instructions": "Be brief.", "input": "hi"}
    chat = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    }
    assert count_responses_input(c, body) == count_chat_prompt(c, chat)
    tool = {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}}
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "call f"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
    ]
    chat_tools = {
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "description": "d", "parameters": {"type": "object"}},
            }
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "call f"}]},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a": 1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ],
    }
    assert count_responses_input(c, {"input": items, "tools": [tool]}) == count_chat_prompt(
        c, chat_tools
    )


def test_responses_input_counts_what_has_no_chat_equivalent(enc: tiktoken.Encoding) -> None:
    c = TokenCounter(enc)
    base = {"input": "hi"}
    plain = count_responses_input(c, base)
    web = {**base, "tools": [{"type": "web_search", "filters": {"allowed_domains": ["x.org"]}}]}
    assert count_responses_input(c, web) > plain
    odd = {"input": ["hi", {"type": "item_reference", "id": "msg_123456"}]}
    assert count_responses_input(c, odd) > count_responses_input(c, {"input": ["hi"]})
    reasoning = {
        "input": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thinking hard"}]},
            "hi",
        ]
    }
    assert count_responses_input(c, reasoning) > count_responses_input(c, {"input": ["hi"]})


RESPONSE = {
    "object": "response",
    "output": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Hmm. "}]},
        {"type": "message", "content": [{"type": "output_text", "text": "Hello"}]},
        {"type": "function_call", "name": "f", "arguments": '{"a":1}'},
    ],
}


def test_responses_replies() -> None:
    reply = responses_reply(RESPONSE)
    assert reply.text == "Hmm. Hello" and reply.tool_calls == (("f", '{"a":1}'),)
    events = [
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {"type": "function_call", "name": "f"},
        },
        {"type": "response.function_call_arguments.delta", "output_index": 0, "delta": '{"a"'},
        {"type": "response.function_call_arguments.delta", "output_index": 0, "delta": ":1}"},
        {"type": "response.output_text.delta", "output_index": 1, "delta": "Hel"},
        {"type": "response.output_text.delta", "output_index": 1, "delta": "lo"},
        {"type": "response.completed", "response": RESPONSE},
    ]
    streamed = responses_stream_reply(events)
    assert streamed.text == "Hello" and streamed.tool_calls == (("f", '{"a":1}'),)
    # No delta relayed, only the final response: its output counts.
    final_only = responses_stream_reply([{"type": "response.completed", "response": RESPONSE}])
    assert final_only == reply


def test_completions_replies() -> None:
    body = {"choices": [{"text": "one", "index": 0}, {"text": " two", "index": 1}]}
    assert completions_reply(body).text == "one two"
    chunks = [{"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]}, {"choices": []}]
    assert completions_stream_reply(chunks).text == "ab"


def test_meter_json_per_format(enc: tiktoken.Encoding) -> None:
    req = {"input": "what is a fig?"}
    body = orjson.dumps({**RESPONSE, "usage": RESPONSES_OK})
    assert meter_json(body, req, enc, fmt=RESPONSES).usage == Usage(10, 7, 4, 3)
    estimated = meter_json(orjson.dumps(RESPONSE), req, enc, fmt=RESPONSES)
    assert estimated.source is UsageSource.ESTIMATED
    reply = responses_reply(RESPONSE)
    assert estimated.usage.completion_tokens == count_text(enc, reply.text) + count_text(
        enc, "f"
    ) + count_text(enc, '{"a":1}')
    assert estimated.usage.prompt_tokens == count_responses_input(TokenCounter(enc), req)
    vectors = orjson.dumps({"data": [{"embedding": [0.1] * 8}]})
    metered = meter_json(vectors, {"input": [1, 2, 3, 4]}, enc, fmt=EMBEDDINGS)
    assert metered.usage == Usage(4, 0) and metered.source is UsageSource.ESTIMATED


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(max_size=20), max_size=8), tools=st.integers(0, 3))
def test_a_responses_estimate_never_counts_less_than_its_parts(texts, tools) -> None:
    enc = ENC.get("o200k_base")
    c = TokenCounter(enc)
    tool = {"type": "function", "name": "tool", "parameters": {"type": "object"}}
    body = {"input": [{"role": "user", "content": t} for t in texts], "tools": [tool] * tools}
    total = count_responses_input(c, body)
    assert total >= sum(count_text(enc, t) for t in texts)
    assert total >= count_responses_input(c, {"input": body["input"]})
