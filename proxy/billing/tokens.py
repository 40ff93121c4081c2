"""OpenAI chat token counting over an offline encoding (proxy.billing.encodings).

Counting is the metering fallback, used when an upstream reports no usage:
``count_text``, ``count_chat_prompt`` (the ``prompt_tokens`` OpenAI would report for
a chat.completions body) and ``count_completion``. The rules are documented on
``count_chat_prompt`` with their sources.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
import tiktoken

from proxy.billing import media
from proxy.billing.counting import TokenCounter, as_counter
from proxy.billing.tool_schema import render_function_definitions, unrendered_schema_text

__all__ = [
    "count_chat_prompt",
    "count_completion",
    "count_text",
    "render_function_definitions",
]

Enc = tiktoken.Encoding | TokenCounter | None

# Per-message framing: <|start|>{role/name}\n{content}<|end|>\n (cookbook, see below).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
# Every reply is primed with <|start|>assistant<|message|>.
REPLY_PRIMING = 3
# Function definitions are wrapped in a system-side block; 9 tokens, 4 of which are
# shared with an existing system message (openai-chat-tokens, see below).
FUNCTIONS_OVERHEAD = 9
FUNCTIONS_SYSTEM_DISCOUNT = 4
FUNCTION_CALL_OVERHEAD = 3  # an assistant message's function_call / each tool call
FUNCTION_RESULT_ADJUST = -2  # a `function` (and, by extension, `tool`) result message
FORCED_FUNCTION_OVERHEAD = 4  # function_call={"name": ...} / tool_choice naming one
CHOICE_NONE_TOKENS = 1  # function_call="none" / tool_choice="none"
# A detail="low" image (proxy.billing.media has the rules for the other details).
IMAGE_PART_TOKENS = media.IMAGE_BASE_TOKENS


def count_text(enc: Enc, text: str) -> int:
    """Tokens in ``text``; special-token-looking text counts as plain text. Never
    raises: a tokenizer failure counts the byte length (proxy.billing.counting)."""
    return as_counter(enc).text(text)


def count_chat_prompt(enc: Enc, body: Mapping[str, Any]) -> int:
    """The ``prompt_tokens`` OpenAI would report for a chat.completions request body.

    Rules (same constants for cl100k_base and o200k_base models):

    1. Each message costs 3 + tokens(role) + tokens(content); a ``name`` adds
       tokens(name) + 1. Every reply is primed with 3 more tokens.
       Source: openai-cookbook ``examples/How_to_count_tokens_with_tiktoken.ipynb``
       ("Counting tokens for chat completions API calls"), verified there against the
       API: 129 prompt tokens (gpt-3.5-turbo, gpt-4) / 124 (gpt-4o, gpt-4o-mini).
    2. ``functions`` / ``tools`` (type "function") are rendered as TypeScript in a
       ``namespace functions { ... }`` block (``render_function_definitions``); they
       cost tokens(rendering) + 9. If there is a system message, the first one gets
       a trailing "\\n" and the total is 4 lower (the block reuses that message).
       An assistant ``function_call`` costs tokens(name) + tokens(arguments) + 3; a
       ``function`` result message costs 2 less than rule 1 gives. ``function_call``
       "none" adds 1; forcing a function by name adds tokens(name) + 4.
       Source: the npm library openai-chat-tokens (github.com/hmarr/openai-chat-tokens,
       continued as coderabbitai/openai-chat-tokens), whose test cases were checked
       against the live API (gpt-3.5-turbo), after the OpenAI forum thread
       "How to calculate the tokens when using function call" (topic 266573). The
       same rendering reproduces the cookbook's "Counting tokens for chat
       completions with tool calls" figures: 105 (gpt-3.5-turbo, gpt-4) and 101
       (gpt-4o, gpt-4o-mini).
    3. Extrapolations without a published figure: each assistant ``tool_calls``
       entry is costed like a ``function_call``; a ``tool`` message like a
       ``function`` message named after the call its ``tool_call_id`` answers;
       ``tool_choice`` like ``function_call``; ``developer`` is costed like any role.
    4. Content given as a list of parts: text (and refusal) parts are concatenated;
       image, file and input_audio parts follow proxy.billing.media (OpenAI's tile
       rule from the image header, bounds where the size is unknown).
    5. Without a published figure, counted as their text so that nothing sent is
       free: the JSON of ``response_format`` (a ``json_schema``'s name, description
       and schema), ``prediction`` content, ``custom`` tools (name, description and
       format as JSON), and tool-schema text the rendering of rule 2 drops (nested
       descriptions, titles, examples, defaults, ...; proxy.billing.tool_schema).

    Malformed parts of ``body`` are skipped, never raised on: validation is not
    this function's job and billing must not fail on odd input.
    """
    enc = as_counter(enc)  # one counter: its failure flag covers the whole count
    plain = _plain_prompt(enc, body)
    return plain if plain is not None else _general_prompt(enc, body)


# Fields that bring in more than rule 1 (functions, tools, choices, rule 5).
_NOT_PLAIN = ("functions", "tools", "tool_choice", "function_call", "response_format", "prediction")


def _plain_prompt(enc: TokenCounter, body: Mapping[str, Any]) -> int | None:
    """`count_chat_prompt` of the usual body, messages of a string role and a string
    content only and none of `_NOT_PLAIN`: rule 1 alone, what the general path
    computes for it (tests/billing/test_tokens.py), without its per-field checks
    (every reservation counts its prompt). None for any other body."""
    messages = body.get("messages")
    if type(messages) is not list:
        return None
    for key in _NOT_PLAIN:
        if key in body:
            return None
    text = enc.text
    total = REPLY_PRIMING
    for message in messages:
        if type(message) is not dict or len(message) != 2:
            return None
        role = message.get("role")
        content = message.get("content")
        if type(role) is not str or type(content) is not str or role == "function":
            return None
        total += TOKENS_PER_MESSAGE + text(role) + text(content)
    return total


def _general_prompt(enc: TokenCounter, body: Mapping[str, Any]) -> int:
    """`count_chat_prompt` of any body (its docstring has the rules)."""
    messages = body.get("messages")
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        messages = ()
    functions = _function_definitions(body)
    total = REPLY_PRIMING + _extras(enc, body, functions)
    padded_system = False
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for tool results
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = _str(message.get("role"))
        text, media_tokens = _content(message.get("content"))
        if functions and role == "system" and not padded_system:
            text += "\n"
            padded_system = True
        tokens = TOKENS_PER_MESSAGE + count_text(enc, role) + count_text(enc, text)
        tokens += media_tokens
        name = _str(message.get("name"))
        if role == "tool":
            name = call_names.get(_str(message.get("tool_call_id")), "")
        if name:
            tokens += count_text(enc, name) + TOKENS_PER_NAME
        if role == "function" or (role == "tool" and name):
            tokens += FUNCTION_RESULT_ADJUST
        for call_id, fn_name, arguments in _calls(message):
            tokens += count_text(enc, fn_name) + count_text(enc, arguments)
            tokens += FUNCTION_CALL_OVERHEAD
            if call_id:
                call_names[call_id] = fn_name
        total += tokens
    if functions:
        total += count_text(enc, render_function_definitions(functions)) + FUNCTIONS_OVERHEAD
        if padded_system:
            total -= FUNCTIONS_SYSTEM_DISCOUNT
    choice = body.get("tool_choice", body.get("function_call"))
    if choice == "none":
        total += CHOICE_NONE_TOKENS
    elif isinstance(choice, Mapping):
        fn = choice.get("function")
        forced = _str(fn.get("name")) if isinstance(fn, Mapping) else _str(choice.get("name"))
        if forced:
            total += count_text(enc, forced) + FORCED_FUNCTION_OVERHEAD
    return max(total, 0)


def count_completion(
    enc: Enc,
    content: str | None,
    tool_calls: Iterable[tuple[str, str]] = (),
) -> int:
    """Completion tokens for text and ``(name, arguments)`` tool calls actually relayed.

    Plain text counts exactly. For tool calls only the name and arguments are counted:
    OpenAI's framing tokens around a generated call are unpublished, so this is a lower
    bound. Hidden reasoning tokens cannot be known and are not estimated.
    """
    enc = as_counter(enc)  # one counter: its failure flag covers the whole count
    total = count_text(enc, content or "")
    for name, arguments in tool_calls:
        total += count_text(enc, name) + count_text(enc, arguments)
    return total


# ------------------------------------------------------------------------ helpers


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _content(content: Any) -> tuple[str, int]:
    """(concatenated text, tokens of the media parts) of a message's content."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    texts: list[str] = []
    tokens = 0
    for part in content:
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind in ("text", "refusal"):
            texts.append(_str(part.get(kind)))
        elif kind == "image_url":
            tokens += media.image_tokens(part)
        elif kind == "file":
            tokens += media.file_tokens(part)
        elif kind == "input_audio":
            tokens += media.audio_tokens(part)
    return "".join(texts), tokens


def _extras(enc: TokenCounter, body: Mapping[str, Any], functions: list[Mapping[str, Any]]) -> int:
    """Rule 5 of count_chat_prompt: request fields without a published token rule."""
    total = 0
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        total += count_text(enc, _json_text(fmt.get("json_schema")))
    prediction = body.get("prediction")
    if isinstance(prediction, Mapping):
        text, _ = _content(prediction.get("content"))
        total += count_text(enc, text)
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, Mapping) and tool.get("type") == "custom":
            total += count_text(enc, _json_text(tool.get("custom")))
    for text in unrendered_schema_text(functions):
        total += count_text(enc, text)
    return total


def _json_text(value: Any) -> str:
    if value is None:
        return ""
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return ""


def _calls(message: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(tool_call_id, name, arguments) of an assistant message's function/tool calls."""
    calls: list[tuple[str, str, str]] = []
    fc = message.get("function_call")
    if isinstance(fc, Mapping):
        calls.append(("", _str(fc.get("name")), _str(fc.get("arguments"))))
    tool_calls = message.get("tool_calls")
    for call in tool_calls if isinstance(tool_calls, list) else ():
        fn = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(fn, Mapping):
            calls.append((_str(call.get("id")), _str(fn.get("name")), _str(fn.get("arguments"))))
    return calls


def _function_definitions(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    defs: list[Mapping[str, Any]] = []
    functions = body.get("functions")
    for fn in functions if isinstance(functions, list) else ():
        if isinstance(fn, Mapping):
            defs.append(fn)
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, Mapping) and tool.get("type", "function") == "function":
            fn = tool.get("function")
            if isinstance(fn, Mapping):
                defs.append(fn)
    return defs
