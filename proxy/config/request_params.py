"""Which chat.completions body fields may change what the provider bills: the one list.

* NEUTRAL_PARAMS never change the price per token: OpenAI's documented request
  fields whose cost shows up in the usage report (more tokens, more reasoning) and
  is priced from it. Always accepted.
* PRICE_PARAMS change the provider's price itself. A request may use one only when
  its alias lists it in `allow_params` (and the alias's price rule prices it);
  otherwise it is a 400 `unsupported_parameter` naming the field.
  - `service_tier`: priority/flex processing (priced by the rule's `service_tiers`;
    absent, null and "default" are the standard price and need no permission);
  - `audio`: the request's `audio` field and `modalities` other than ["text"]
    (priced by `audio_input` / `audio_output`);
  - `web_search_options`: web search (priced by `request_fee`).
* Any other field is unknown to us: a gateway's routing field (OpenRouter's
  `models`/`route`/`provider`, a fallback list) or a vendor extension may move the
  call to another model or price. It is refused unless `allow_params` names it,
  i.e. an operator vouched that the rule prices it.
"""

from __future__ import annotations

from typing import Final

NEUTRAL_PARAMS: Final = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "n",
        "stop",
        "max_tokens",
        "max_completion_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "user",
        "seed",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "response_format",
        "metadata",
        "store",
        "reasoning_effort",
        "prediction",
        "verbosity",
        "safety_identifier",
        "prompt_cache_key",
    }
)

SERVICE_TIER: Final = "service_tier"
AUDIO: Final = "audio"
WEB_SEARCH: Final = "web_search_options"
# Permission name -> the body fields it covers.
PRICE_PARAMS: Final = {
    SERVICE_TIER: ("service_tier",),
    AUDIO: ("audio", "modalities"),
    WEB_SEARCH: ("web_search_options",),
}

# The same rule for the other endpoints: each one's documented fields that are
# priced from its usage report. Not in these lists: the Responses API's
# `background` (the reply is a queued response without usage: the call would be
# charged its prompt only) and built-in tools (`web_search`, `file_search`, ...:
# per-call fees), which an alias must allow like any price-changing field
# (proxy.billing.price_params.check_builtin_tools).
RESPONSES_NEUTRAL_PARAMS: Final = frozenset(
    {
        "model",
        "input",
        "instructions",
        "stream",
        "stream_options",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "temperature",
        "top_p",
        "top_logprobs",
        "max_output_tokens",
        "max_tool_calls",
        "metadata",
        "previous_response_id",
        "conversation",
        "reasoning",
        "store",
        "text",
        "truncation",
        "user",
        "include",
        "prompt",
        "prompt_cache_key",
        "safety_identifier",
    }
)
EMBEDDINGS_NEUTRAL_PARAMS: Final = frozenset(
    {"model", "input", "dimensions", "encoding_format", "user"}
)
COMPLETIONS_NEUTRAL_PARAMS: Final = frozenset(
    {
        "model",
        "prompt",
        "suffix",
        "stream",
        "stream_options",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "best_of",
        "echo",
        "logprobs",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "seed",
    }
)
