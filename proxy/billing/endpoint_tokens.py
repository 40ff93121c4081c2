"""Local prompt counts of the endpoints beside chat.completions (the metering
fallback when a provider reports no usage).

* Legacy completions and embeddings: the prompt/input is plain text (no message
  framing): a string, a list of strings, a token array (counted by its length) or
  a list of token arrays; a completions `suffix` counts as text too.
* The Responses API: its body is read as the chat body it stands for (instructions
  → a system message, input items → messages, function tools → chat tools) and
  counted with chat's rules (proxy.billing.tokens); what has no chat equivalent
  (built-in tools, unknown items, a reusable prompt's variables) counts as the
  text of its JSON, so nothing sent is free. Context the provider keeps itself
  (`previous_response_id`, `conversation`) cannot be seen here: an estimate of
  such a request is a lower bound (README "Endpoints").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.billing.counting import TokenCounter
from proxy.billing.tokens import count_chat_prompt, count_text


def count_text_input(enc: TokenCounter, value: Any) -> int:
    """A completions `prompt` / embeddings `input`: text, texts or token arrays."""
    if isinstance(value, str):
        return count_text(enc, value)
    if not isinstance(value, list):
        return count_text(enc, _json_text(value)) if value is not None else 0
    if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return len(value)  # one token array
    return sum(count_text_input(enc, v) for v in value)


def count_completions_prompt(enc: TokenCounter, body: Mapping[str, Any]) -> int:
    total = count_text_input(enc, body.get("prompt"))
    suffix = body.get("suffix")
    if isinstance(suffix, str):
        total += count_text(enc, suffix)
    return total


def count_embeddings_input(enc: TokenCounter, body: Mapping[str, Any]) -> int:
    return count_text_input(enc, body.get("input"))


# -- the Responses API ----------------------------------------------------------------

_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


def count_responses_input(enc: TokenCounter, body: Mapping[str, Any]) -> int:
    chat, extra = responses_as_chat(body)
    return count_chat_prompt(enc, chat) + sum(count_text(enc, text) for text in extra)


def responses_as_chat(body: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the chat body a Responses body stands for, texts counted beside it)."""
    messages: list[dict[str, Any]] = []
    extra: list[str] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    for item in items if isinstance(items, list) else ():
        message = _item_message(item)
        if message is not None:
            messages.append(message)
        elif item is not None:
            extra.append(_json_text(item))
    chat: dict[str, Any] = {"messages": messages}
    tools: list[dict[str, Any]] = []
    raw_tools = body.get("tools")
    for tool in raw_tools if isinstance(raw_tools, list) else ():
        if isinstance(tool, Mapping) and tool.get("type") == "function":
            fn = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            tools.append({"type": "function", "function": fn})
        elif tool is not None:
            extra.append(_json_text(tool))  # built-in and custom tools: their JSON
    if tools:
        chat["tools"] = tools
    choice = body.get("tool_choice")
    if choice == "none":
        chat["tool_choice"] = "none"
    elif isinstance(choice, Mapping) and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        schema = {k: v for k, v in fmt.items() if k != "type"}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    prompt = body.get("prompt")  # a stored prompt template: its variables are sent
    if isinstance(prompt, Mapping):
        extra.append(_json_text(prompt.get("variables")))
    return chat, extra


def _item_message(item: Any) -> dict[str, Any] | None:
    """One input item as a chat message; None for an item without an equivalent."""
    if isinstance(item, str):
        return {"role": "user", "content": item}
    if not isinstance(item, Mapping):
        return None
    kind = item.get("type", "message")
    if kind == "message" and isinstance(item.get("role"), str):
        return {"role": item["role"], "content": _content(item.get("content"))}
    if kind == "function_call":
        call = {"name": _str(item.get("name")), "arguments": _str(item.get("arguments"))}
        return {
            "role": "assistant",
            "tool_calls": [{"id": _str(item.get("call_id")), "type": "function", "function": call}],
        }
    if kind == "function_call_output":
        output = item.get("output")
        content = output if isinstance(output, str) else _content(output)
        return {"role": "tool", "tool_call_id": _str(item.get("call_id")), "content": content}
    if kind == "reasoning":
        texts = [_str(p.get("text")) for p in _parts(item.get("summary"))]
        texts += [_str(p.get("text")) for p in _parts(item.get("content"))]
        texts.append(_str(item.get("encrypted_content")))  # decrypted upstream: bound it
        return {"role": "assistant", "content": "".join(texts)}
    return None


def _content(content: Any) -> Any:
    """Responses content parts as chat content parts."""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in _parts(content):
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": _str(part.get("text"))})
        elif kind == "refusal":
            parts.append({"type": "refusal", "refusal": _str(part.get("refusal"))})
        elif kind == "input_image":
            url = part.get("image_url")
            image = {"url": url if isinstance(url, str) else "", "detail": part.get("detail")}
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_file":
            keys = ("file_data", "file_id", "filename")
            parts.append({"type": "file", "file": {k: part[k] for k in keys if k in part}})
        elif kind == "input_audio":
            parts.append({"type": "input_audio", "input_audio": part.get("input_audio")})
        else:
            parts.append({"type": "text", "text": _json_text(part)})
    return parts


def _parts(value: Any) -> list[Mapping[str, Any]]:
    return [p for p in value if isinstance(p, Mapping)] if isinstance(value, list) else []


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _json_text(value: Any) -> str:
    if value is None:
        return ""
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return ""
