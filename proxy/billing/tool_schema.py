"""Rendering tool definitions the way OpenAI shows them to the model (for counting),
and the schema text that rendering leaves out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def render_function_definitions(functions: Sequence[Mapping[str, Any]]) -> str:
    """JSON-schema function definitions as the TypeScript OpenAI shows the model.

    Format per openai-chat-tokens (see ``count_chat_prompt``): descriptions become
    ``//`` comments (only at the top two levels), optional properties get ``?``,
    enums become unions, ``anyOf`` becomes a union, arrays ``T[]``.
    """
    lines = ["namespace functions {", ""]
    for fn in functions:
        description = _str(fn.get("description"))
        if description:
            lines.append(f"// {description}")
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, Mapping) else None
        if isinstance(params, Mapping) and isinstance(props, Mapping) and props:
            lines.append(f"type {_str(fn.get('name'))} = (_: {{")
            lines.append(_format_properties(params, 0))
            lines.append("}) => any;")
        else:
            lines.append(f"type {_str(fn.get('name'))} = () => any;")
        lines.append("")
    lines.append("} // namespace functions")
    return "\n".join(lines)


def _format_properties(obj: Mapping[str, Any], indent: int) -> str:
    props = obj.get("properties")
    required = obj.get("required")
    required = required if isinstance(required, list) else []
    lines: list[str] = []
    for name, prop in props.items() if isinstance(props, Mapping) else ():
        if not isinstance(prop, Mapping):
            prop = {}
        description = _str(prop.get("description"))
        if description and indent < 2:
            lines.append(f"// {description}")
        optional = "" if name in required else "?"
        lines.append(f"{name}{optional}: {_format_type(prop, indent)},")
    return "\n".join(" " * indent + line for line in lines)


def _format_type(prop: Mapping[str, Any], indent: int) -> str:
    any_of = prop.get("anyOf")
    if isinstance(any_of, list):
        return " | ".join(_format_type(p if isinstance(p, Mapping) else {}, indent) for p in any_of)
    kind = prop.get("type")
    enum = prop.get("enum")
    if isinstance(enum, list) and kind in ("string", "number", "integer"):
        return " | ".join(f'"{v}"' if kind == "string" else _js_literal(v) for v in enum)
    if kind in ("string", "number", "boolean", "null"):
        return str(kind)
    if kind == "integer":
        return "number"
    if kind == "object":
        return "\n".join(["{", _format_properties(prop, indent + 2), "}"])
    if kind == "array":
        items = prop.get("items")
        return f"{_format_type(items, indent)}[]" if isinstance(items, Mapping) else "any[]"
    return "any"


def _js_literal(value: Any) -> str:
    # Enum values are printed the way JavaScript's template strings print them.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# Schema keywords whose text the rendering above drops although the model is given it
# (OpenAI does not publish its tool framing; the rendering only keeps descriptions at
# the top two levels). Their text is counted on top, so nested schemas never count less.
# (`const` is not here: the API figure of example fn-anyof-one shows it costs nothing.)
_UNRENDERED = ("title", "examples", "default", "example")


def unrendered_schema_text(functions: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """Text of the schema fields `render_function_definitions` leaves out."""
    for fn in functions:
        params = fn.get("parameters")
        if isinstance(params, Mapping):
            yield from _unrendered(params, 0)


def _unrendered(schema: Mapping[str, Any], depth: int) -> Iterator[str]:
    description = schema.get("description")
    if depth >= 2 and isinstance(description, str):  # deeper than rendered
        yield description
    for key in _UNRENDERED:
        if key in schema:
            value = schema[key]
            yield value if isinstance(value, str) else _json_text(value)
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            if isinstance(value, Mapping):
                for sub in value.values():
                    if isinstance(sub, Mapping):
                        yield from _unrendered(sub, depth + 1)
        elif key in ("items", "additionalProperties", "not", "contains"):
            if isinstance(value, Mapping):
                yield from _unrendered(value, depth + 1)
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
            for sub in value:
                if isinstance(sub, Mapping):
                    yield from _unrendered(sub, depth + 1)


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return str(value)
