"""Reading and validating the bodies of the endpoints beside chat.completions
(/v1/responses, /v1/embeddings, /v1/completions) into a `ChatRequest` whose
`format` names the endpoint's metering pieces. Chat's own is
proxy.server.chat_request, whose shared steps (alias, stream flag) these reuse."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.billing.price_params import check_builtin_tools, check_price_params
from proxy.billing.record import ChatRequest
from proxy.billing.wire_formats import COMPLETIONS, EMBEDDINGS, RESPONSES
from proxy.config.model import Alias
from proxy.config.request_params import (
    COMPLETIONS_NEUTRAL_PARAMS,
    EMBEDDINGS_NEUTRAL_PARAMS,
    RESPONSES_NEUTRAL_PARAMS,
)
from proxy.errors import invalid_request
from proxy.server.chat_request import lookup_alias, parse_stream, usage_option


def parse_responses_request(
    body: dict[str, Any], aliases: Mapping[str, Alias], *, started_ms: int
) -> ChatRequest:
    alias = lookup_alias(body, aliases, "responses")
    items = body.get("input")
    if items is None and not any(
        body.get(k) is not None for k in ("prompt", "previous_response_id", "conversation")
    ):
        raise invalid_request(
            "'input' is required (a string or an array of input items)",
            param="input",
            code="missing_required_parameter",
        )
    if items is not None and not isinstance(items, str | list):
        raise invalid_request(
            "'input' must be a string or an array of input items",
            param="input",
            code="invalid_type",
        )
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid_request(
            "'instructions' must be a string", param="instructions", code="invalid_type"
        )
    stream = parse_stream(body)
    tier = check_price_params(body, alias, started_ms, RESPONSES_NEUTRAL_PARAMS, "responses")
    check_builtin_tools(body, alias, started_ms)
    # A Responses stream always ends with its usage: nothing is asked for, nothing cut.
    return ChatRequest(alias, body, stream, True, tier, RESPONSES)


def parse_embeddings_request(
    body: dict[str, Any], aliases: Mapping[str, Alias], *, started_ms: int
) -> ChatRequest:
    alias = lookup_alias(body, aliases, "embeddings")
    _text_input(body, "input")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
        raise invalid_request(
            "'dimensions' must be a positive integer", param="dimensions", code="invalid_type"
        )
    tier = check_price_params(body, alias, started_ms, EMBEDDINGS_NEUTRAL_PARAMS, "embeddings")
    return ChatRequest(alias, body, False, True, tier, EMBEDDINGS)


def parse_completions_request(
    body: dict[str, Any], aliases: Mapping[str, Alias], *, started_ms: int
) -> ChatRequest:
    alias = lookup_alias(body, aliases, "completions")
    _text_input(body, "prompt")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise invalid_request("'suffix' must be a string", param="suffix", code="invalid_type")
    stream = parse_stream(body)
    usage_requested = usage_option(body)
    tier = check_price_params(body, alias, started_ms, COMPLETIONS_NEUTRAL_PARAMS, "completions")
    return ChatRequest(alias, body, stream, usage_requested, tier, COMPLETIONS)


def _text_input(body: Mapping[str, Any], field: str) -> None:
    """A string, an array of strings, a token array or an array of token arrays."""
    value = body.get(field)
    if value is None:
        raise invalid_request(
            f"'{field}' is required", param=field, code="missing_required_parameter"
        )
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value) or all(_is_token(v) for v in value):
            return
        if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
            return
    raise invalid_request(
        f"'{field}' must be a string, an array of strings, an array of token ids "
        "or an array of token-id arrays (none empty)",
        param=field,
        code="invalid_type",
    )


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
