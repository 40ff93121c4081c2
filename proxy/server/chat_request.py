"""Reading and validating a chat.completions request into a `ChatRequest`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from proxy.billing.price_params import check_price_params
from proxy.billing.record import ChatRequest
from proxy.config.model import ENDPOINT_NAMES, Alias
from proxy.errors import (
    invalid_request,
    model_not_found,
    request_too_large,
    responses_unsupported,
    unsupported_endpoint,
    unsupported_media_type,
)

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
    raise unsupported_media_type(mime)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The raw body, refusing oversized ones before reading them whole."""
    check_content_type(request)
    length = request.content_length
    if length is not None:
        if length > limit:
            raise request_too_large(limit)
        if length == 0:
            return b""
        # The declared length bounds it (the HTTP parser stops there): one read, no
        # chunk iterator (~5 us a request less).
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:  # the body ended early: what came
            return exc.partial
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise request_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


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


def lookup_alias(body: Mapping[str, Any], aliases: Mapping[str, Alias], endpoint: str) -> Alias:
    """The body's `model` as an alias that serves `endpoint` (every endpoint's first step)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request(
            "'model' is required and must be a string",
            param="model",
            code="invalid_type" if "model" in body else "missing_required_parameter",
        )
    alias = aliases.get(model)
    if alias is None:
        raise model_not_found(model)
    check_serves(alias, endpoint)
    return alias


def check_serves(alias: Alias, endpoint: str) -> None:
    if alias.serves(endpoint):
        return
    if endpoint == "responses" and "responses" in alias.endpoints:
        raise responses_unsupported(alias.name, alias.provider.name)
    served = [e for e in ENDPOINT_NAMES if alias.serves(ENDPOINT_NAMES[e])]
    raise unsupported_endpoint(alias.name, endpoint, served)


def parse_stream(body: Mapping[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise invalid_request("'stream' must be a boolean", param="stream", code="invalid_type")
    return stream


def usage_option(body: Mapping[str, Any]) -> bool:
    """Whether the caller asked for the usage chunk itself (`stream_options`)."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_request(
            "'stream_options' must be an object", param="stream_options", code="invalid_type"
        )
    return bool(options and options.get("include_usage") is True)


def parse_chat_request(
    body: dict[str, Any], aliases: Mapping[str, Alias], *, started_ms: int
) -> ChatRequest:
    """Validate a decoded body against the configured aliases; `started_ms` (unix ms)
    picks the price version that price-changing fields are checked against."""
    alias = lookup_alias(body, aliases, "chat.completions")
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
    stream = parse_stream(body)
    usage_requested = usage_option(body)
    service_tier = check_price_params(body, alias, started_ms)
    # Positional (alias, body, stream, usage_requested, service_tier): cheaper.
    return ChatRequest(alias, body, stream, usage_requested, service_tier)
