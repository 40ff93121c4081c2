"""Validating a chat.completions request body and preparing its upstream form."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.config import Alias
from proxy.errors import ApiError, invalid_request


@dataclass(frozen=True, slots=True)
class ChatRequest:
    alias: Alias
    body: dict[str, Any]  # the caller's body, as parsed (used for prompt counting)
    stream: bool
    # The caller asked for `stream_options.include_usage` itself; if not, the
    # usage-only chunk we request on its behalf is removed from its stream.
    usage_requested: bool

    def upstream_body(self) -> tuple[bytes, bool]:
        """The body to send upstream, and whether the usage chunk must be stripped."""
        out = dict(self.body)
        out["model"] = self.alias.model
        strip = False
        if self.stream and self.alias.provider.stream_usage and not self.usage_requested:
            options = out.get("stream_options")
            out["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            strip = True
        try:
            return orjson.dumps(out), strip
        except orjson.JSONEncodeError:
            # orjson reads up to 1024 levels of nesting but writes at most 255: a body
            # in between parses fine and cannot be forwarded. It is the caller's input.
            raise invalid_request(
                "request body nests too deeply (at most 255 levels)", code="invalid_json"
            ) from None


_UNLABELLED = frozenset({"application/octet-stream"})


def check_content_type(request: web.Request) -> None:
    """A declared content type must be JSON. None at all, or the generic
    `application/octet-stream` many HTTP libraries send for raw bytes, is accepted;
    a form, text or multipart body is refused before it is read."""
    declared = request.headers.get("Content-Type")
    if declared is None or not declared.strip():
        return
    mime = declared.split(";", 1)[0].strip().lower()
    if mime in _UNLABELLED or (mime.startswith("application/") and mime.endswith("json")):
        return
    raise ApiError(
        415,
        f"Content-Type must be application/json, got {mime[:100]!r}",
        type="invalid_request_error",
        code="unsupported_media_type",
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    """The raw body, refusing oversized ones before reading them whole."""
    check_content_type(request)
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body exceeds the limit of {limit} bytes",
        type="invalid_request_error",
        code="request_too_large",
    )


def decode_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or 400."""
    if not raw:
        raise invalid_request("request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid_request(
            f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise invalid_request("request body must be a JSON object", code="invalid_json")
    return body


def body_user(body: Mapping[str, Any]) -> str | None:
    """OpenAI's optional end-user field (service keys may bill it, see billing)."""
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid_request("'user' must be a string", param="user", code="invalid_type")
    return user


def parse_chat_request(body: dict[str, Any], aliases: Mapping[str, Alias]) -> ChatRequest:
    """Validate a decoded body against the configured aliases."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request(
            "'model' is required and must be a string",
            param="model",
            code="invalid_type" if "model" in body else "missing_required_parameter",
        )
    alias = aliases.get(model)
    if alias is None:
        raise ApiError(
            404,
            f"The model '{model[:200]}' does not exist or you do not have access to it.",
            type="invalid_request_error",
            code="model_not_found",
            param="model",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request(
            "'messages' must be a non-empty array",
            param="messages",
            code="invalid_type" if "messages" in body else "missing_required_parameter",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid_request(
                f"'messages[{i}]' must be an object with a string 'role'",
                param=f"messages[{i}]",
                code="invalid_type",
            )
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid_request("'stream' must be a boolean", param="stream", code="invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_request(
            "'stream_options' must be an object", param="stream_options", code="invalid_type"
        )
    usage_requested = bool(options and options.get("include_usage") is True)
    return ChatRequest(alias=alias, body=body, stream=stream, usage_requested=usage_requested)
