"""Reading and validating a chat request: content type, size limits, JSON decoding,
the `user` field and every parse error's status, code and param."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from proxy.config.model import Alias, Provider
from proxy.errors import ApiError
from proxy.server.app import error_middleware
from proxy.server.chat_request import (
    body_user,
    check_content_type,
    decode_body,
    parse_chat_request,
    read_body,
)

LIMIT = 1024
PROVIDER = Provider(name="acme", base_url="http://u/v1", api_key_env=None, api_key=None)
ALIASES = {"smart": Alias(name="smart", provider=PROVIDER, model="up-1", price_rule=None)}
MESSAGES = [{"role": "user", "content": "hi"}]
NOW_MS = 1_800_000_000_000  # request start (unix ms): picks the price version in force
REQ = {"model": "smart", "messages": MESSAGES}


def api_error(exc_info: pytest.ExceptionInfo[ApiError]) -> tuple[int, str | None, str | None]:
    return exc_info.value.status, exc_info.value.code, exc_info.value.param


# -- check_content_type ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.api+json",
        "application/octet-stream",
    ],
)
def test_json_missing_or_unlabelled_content_types_are_accepted(value: str | None) -> None:
    headers = {} if value is None else {"Content-Type": value}
    check_content_type(make_mocked_request("POST", "/", headers=headers))


@pytest.mark.parametrize(
    "value",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_other_content_types_are_415(value: str) -> None:
    with pytest.raises(ApiError) as info:
        check_content_type(make_mocked_request("POST", "/", headers={"Content-Type": value}))
    assert api_error(info) == (415, "unsupported_media_type", None)
    assert value.split(";")[0] in info.value.message


# -- read_body -----------------------------------------------------------------------


@pytest.fixture
async def body_reader() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    async def handler(request: web.Request) -> web.Response:
        raw = await read_body(request, LIMIT)
        return web.json_response({"size": len(raw), "sha": raw[:8].hex()})

    app = web.Application(middlewares=[error_middleware], client_max_size=LIMIT * 100)
    app.router.add_post("/read", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield f"http://127.0.0.1:{server.port}/read", session
    finally:
        await session.close()
        await server.close()


async def post(
    reader: tuple[str, aiohttp.ClientSession], data: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    url, session = reader
    async with session.post(url, data=data, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


async def test_body_at_the_limit_is_read_whole(
    body_reader: tuple[str, aiohttp.ClientSession],
) -> None:
    status, out = await post(body_reader, b"x" * LIMIT, {"Content-Type": "application/json"})
    assert (status, out["size"]) == (200, LIMIT)


async def test_declared_length_over_the_limit_is_413(
    body_reader: tuple[str, aiohttp.ClientSession],
) -> None:
    status, out = await post(body_reader, b"x" * (LIMIT + 1))
    assert status == 413
    assert out["error"]["code"] == "request_too_large"
    assert str(LIMIT) in out["error"]["message"]


async def test_chunked_body_over_the_limit_is_413(
    body_reader: tuple[str, aiohttp.ClientSession],
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * (LIMIT // 2)

    status, out = await post(body_reader, chunks())
    assert status == 413
    assert out["error"]["code"] == "request_too_large"


async def test_chunked_body_within_the_limit_is_read(
    body_reader: tuple[str, aiohttp.ClientSession],
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"z" * 100

    status, out = await post(body_reader, chunks())
    assert (status, out["size"]) == (200, 300)


async def test_wrong_content_type_is_refused_before_reading(
    body_reader: tuple[str, aiohttp.ClientSession],
) -> None:
    # Even an oversized body: the media type is checked first.
    status, out = await post(body_reader, b"x" * (LIMIT * 2), {"Content-Type": "text/plain"})
    assert status == 415
    assert out["error"]["code"] == "unsupported_media_type"


# -- decode_body ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "empty"),
        (b"{nope", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"null", "JSON object"),
    ],
)
def test_decode_body_errors_are_400_invalid_json(raw: bytes, fragment: str) -> None:
    with pytest.raises(ApiError) as info:
        decode_body(raw)
    assert api_error(info) == (400, "invalid_json", None)
    assert fragment in info.value.message


def test_decode_body_returns_the_object() -> None:
    assert decode_body(b'{"model": "smart", "n": 1}') == {"model": "smart", "n": 1}


# -- body_user -----------------------------------------------------------------------


def test_body_user_is_optional_and_a_string() -> None:
    assert body_user({}) is None
    assert body_user({"user": None}) is None
    assert body_user({"user": "u-42"}) == "u-42"


@pytest.mark.parametrize("value", [42, ["a"], {"id": 1}, True])
def test_body_user_of_another_type_is_400(value: object) -> None:
    with pytest.raises(ApiError) as info:
        body_user({"user": value})
    assert api_error(info) == (400, "invalid_type", "user")


# -- parse_chat_request --------------------------------------------------------------


def test_a_valid_request_is_parsed() -> None:
    body = {"model": "smart", "messages": MESSAGES}
    chat = parse_chat_request(body, ALIASES, started_ms=NOW_MS)
    assert chat.alias is ALIASES["smart"]
    assert chat.body is body
    assert (chat.stream, chat.usage_requested) == (False, False)


@pytest.mark.parametrize(
    ("options", "requested"),
    [
        (None, False),
        ({}, False),
        ({"include_usage": False}, False),
        ({"include_usage": 1}, False),
        ({"include_usage": True}, True),
    ],
)
def test_usage_requested_only_for_include_usage_true(
    options: dict[str, Any] | None, requested: bool
) -> None:
    body = {"model": "smart", "messages": MESSAGES, "stream": True, "stream_options": options}
    chat = parse_chat_request(body, ALIASES, started_ms=NOW_MS)
    assert chat.stream is True
    assert chat.usage_requested is requested


def test_stream_null_means_not_streamed() -> None:
    body = {"model": "smart", "messages": MESSAGES, "stream": None}
    assert parse_chat_request(body, ALIASES, started_ms=NOW_MS).stream is False


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"messages": MESSAGES}, (400, "missing_required_parameter", "model")),
        ({"model": None, "messages": MESSAGES}, (400, "invalid_type", "model")),
        ({"model": "", "messages": MESSAGES}, (400, "invalid_type", "model")),
        ({"model": 5, "messages": MESSAGES}, (400, "invalid_type", "model")),
        ({"model": "nope", "messages": MESSAGES}, (404, "model_not_found", "model")),
        ({"model": "smart"}, (400, "missing_required_parameter", "messages")),
        ({"model": "smart", "messages": []}, (400, "invalid_type", "messages")),
        ({"model": "smart", "messages": "hi"}, (400, "invalid_type", "messages")),
        ({"model": "smart", "messages": ["hi"]}, (400, "invalid_type", "messages[0]")),
        (
            {"model": "smart", "messages": [*MESSAGES, {"content": "no role"}]},
            (400, "invalid_type", "messages[1]"),
        ),
        (
            {"model": "smart", "messages": [{"role": 3}]},
            (400, "invalid_type", "messages[0]"),
        ),
        ({**REQ, "stream": "yes"}, (400, "invalid_type", "stream")),
        ({**REQ, "stream": 1}, (400, "invalid_type", "stream")),
        (
            {"model": "smart", "messages": MESSAGES, "stream_options": [True]},
            (400, "invalid_type", "stream_options"),
        ),
    ],
)
def test_parse_errors_name_their_code_and_param(
    body: dict[str, Any], expected: tuple[int, str, str]
) -> None:
    with pytest.raises(ApiError) as info:
        parse_chat_request(body, ALIASES, started_ms=NOW_MS)
    assert api_error(info) == expected


def test_model_is_checked_before_messages() -> None:
    with pytest.raises(ApiError) as info:
        parse_chat_request({"model": "nope"}, ALIASES, started_ms=NOW_MS)
    assert info.value.code == "model_not_found"


def test_unknown_model_message_is_bounded() -> None:
    with pytest.raises(ApiError) as info:
        parse_chat_request(
            {"model": "m" * 10_000, "messages": MESSAGES}, ALIASES, started_ms=NOW_MS
        )
    assert len(info.value.message) < 400
