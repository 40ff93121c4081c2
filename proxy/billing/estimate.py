"""What a request may cost, estimated at admission (before the upstream is called).

    prompt_tokens = a cheap upper bound of the prompt: OpenAI's chat counting rules
                    (proxy.billing.tokens) with every piece of text counted as its
                    UTF-8 bytes (a token covers at least one byte) and images, files
                    and audio by the conservative rules of proxy.billing.media
    output_tokens = (max_completion_tokens, else max_tokens, else the alias's
                    reserve_output_tokens) x n (the number of choices asked for)
    credits       = pricing.upper_bound(prompt_tokens, output_tokens): every prompt
                    token at the dearest input rate, every output token at the
                    dearest output rate, fee, minimum, rounding up, as `price`

No tokenizer runs on the hot path: the byte bound walks the body once (~2-5 us
for a chat of a few messages, bench/bench_reserve.py). It over-states English
text about 4x, which only matters for prompt-heavy requests of users near zero;
the output allowance usually dominates. The estimate is an upper bound of the
charge whenever the output limit holds (a provider never returns more than the
request's limit), so the overdraft a reservation allows comes only from requests
that name no limit and produce more than `reserve_output_tokens`.

A plain function of the parsed request and its alias: rate limits (tokens per
minute) use the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.billing.counting import TokenCounter
from proxy.billing.pricing import affordable_output, upper_bound
from proxy.billing.record import ChatRequest
from proxy.billing.tokens import count_chat_prompt
from proxy.contract.charge_event import MAX_TOKENS

# The body fields that cap a chat completion's output, in the order they win.
OUTPUT_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens")
_MAX_CHOICES = 128  # OpenAI's own limit of `n`


@dataclass(frozen=True, slots=True)
class Estimate:
    prompt_tokens: int  # upper bound of the prompt
    output_tokens: int  # the output allowance (all choices)
    credits: int  # upper bound of the charge for both
    limited: bool  # the request names its output limit (else the alias's allowance)


def estimate_request(chat: ChatRequest, *, started_ms: int = 0) -> Estimate:
    """The admission estimate of `chat` (see the module docstring)."""
    body = chat.body
    prompt = min(count_chat_prompt(TokenCounter(None), body), MAX_TOKENS)
    limit = output_limit(body)
    per_choice = chat.alias.reserve_output_tokens if limit is None else limit
    output = min(per_choice * choices(body), MAX_TOKENS)
    credits = upper_bound(
        chat.alias.price_rule,
        prompt,
        output,
        service_tier=chat.service_tier,
        started_ms=started_ms,
    )
    return Estimate(prompt, output, credits, limit is not None)


def output_limit(body: dict[str, Any]) -> int | None:
    """The request's own cap on output tokens per choice, if it names a usable one."""
    for name in OUTPUT_LIMIT_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        return min(n, _MAX_CHOICES)
    return 1


def clamped_output(chat: ChatRequest, estimate: Estimate, credits: int, *, started_ms: int) -> int:
    """Output tokens per choice whose estimate fits in `credits` (0: not even one)."""
    total = affordable_output(
        chat.alias.price_rule,
        estimate.prompt_tokens,
        credits,
        service_tier=chat.service_tier,
        started_ms=started_ms,
    )
    if total is None:  # output is free: nothing to clamp
        return estimate.output_tokens
    return min(total // choices(chat.body), estimate.output_tokens)


def with_output_limit(chat: ChatRequest, tokens: int) -> ChatRequest:
    """`chat` whose body caps the output at `tokens` per choice: the field the caller
    used is lowered (max_tokens stays max_tokens: some providers refuse both), else
    max_completion_tokens is added. The upstream body is built from it."""
    body = dict(chat.body)
    field = "max_tokens" if "max_tokens" in body and "max_completion_tokens" not in body else None
    body[field or "max_completion_tokens"] = tokens
    return ChatRequest(
        alias=chat.alias,
        body=body,
        stream=chat.stream,
        usage_requested=chat.usage_requested,
        service_tier=chat.service_tier,
    )
