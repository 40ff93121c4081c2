"""What a request may cost, estimated at admission (before the upstream is called).

    prompt_tokens = a cheap upper bound of the prompt: the endpoint's counting rules
                    (chat, responses, embeddings, completions: the request's
                    WireFormat) with every piece of text counted as its UTF-8 bytes
                    (a token covers at least one byte) and images, files and audio by
                    the conservative rules of proxy.billing.media
    output_tokens = (the request's output limit: max_completion_tokens, else
                    max_tokens for chat; max_tokens for completions;
                    max_output_tokens for responses; else the alias's
                    reserve_output_tokens) x n (the number of choices asked for);
                    0 for embeddings (no output)
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
minute, proxy.billing.limits) admit on the same numbers.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Final

from proxy.billing.counting import TokenCounter
from proxy.billing.pricing import affordable_output, upper_bound
from proxy.billing.record import ChatRequest
from proxy.contract.charge_event import MAX_TOKENS
from proxy.contract.records import record

# The body fields that cap the output per endpoint, in the order they win; clamp
# mode adds the first when the caller named none. Embeddings have no output.
OUTPUT_LIMIT_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "chat.completions": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "embeddings": (),
}
_MAX_CHOICES = 128  # OpenAI's own limit of `n`


@record
class Estimate:
    prompt_tokens: int  # upper bound of the prompt
    output_tokens: int  # the output allowance (all choices)
    credits: int  # upper bound of the charge for both
    limited: bool  # the request names its output limit (else the alias's allowance)


def estimate_request(chat: ChatRequest, *, started_ms: int = 0) -> Estimate:
    """The admission estimate of `chat` (see the module docstring)."""
    prompt = prompt_bound(chat)
    output, limited = output_allowance(chat, chat.alias.reserve_output_tokens)
    credits = upper_bound(
        chat.alias.price_rule,
        prompt,
        output,
        service_tier=chat.service_tier,
        started_ms=started_ms,
    )
    return Estimate(prompt, output, credits, limited)


def prompt_bound(chat: ChatRequest) -> int:
    """An upper bound of the prompt's tokens, without a tokenizer."""
    return min(chat.format.count_prompt(TokenCounter(None), chat.body), MAX_TOKENS)


def output_allowance(chat: ChatRequest, default: int) -> tuple[int, bool]:
    """Output tokens the request may produce (all choices), and whether it names
    its own limit (else `default` per choice)."""
    fields = OUTPUT_LIMIT_FIELDS.get(chat.endpoint, ())
    if not fields:
        return 0, True
    limit = output_limit(chat.body, fields)
    per_choice = default if limit is None else limit
    return min(per_choice * choices(chat.body), MAX_TOKENS), limit is not None


def output_limit(body: dict[str, Any], fields: tuple[str, ...]) -> int | None:
    """The request's own cap on output tokens per choice, if it names a usable one."""
    for name in fields:
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
    the endpoint's first limit field is added. The upstream body is built from it."""
    fields = OUTPUT_LIMIT_FIELDS.get(chat.endpoint, ())
    if not fields:
        return chat
    body = dict(chat.body)
    used = [f for f in fields if f in body]
    body[used[0] if len(used) == 1 else fields[0]] = tokens
    return replace(chat, body=body)
