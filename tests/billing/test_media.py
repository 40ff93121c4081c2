"""Token rules for images, files and audio, and the request fields counted by rule 5."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import pytest
import tiktoken

from proxy.billing import media
from proxy.billing.counting import TokenCounter
from proxy.billing.encodings import EncodingRegistry
from proxy.billing.tokens import count_chat_prompt, count_completion, count_text


@pytest.fixture(scope="module")
def o200k() -> tiktoken.Encoding:
    return EncodingRegistry().get("o200k_base")


def png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def jpeg(width: int, height: int) -> bytes:
    app0 = (
        b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    )
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof + b"\xff\xd9"


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00" * 8


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [
        # OpenAI's worked examples (vision guide, "Calculating costs"):
        (1024, 1024, 765),  # -> 768x768, 4 tiles
        (2048, 4096, 1105),  # -> 1024x2048 -> 768x1536, 6 tiles
        (512, 512, 255),  # never enlarged: 1 tile
        (4096, 8192, 1105),
        (2048, 768, 1445),  # the most an image can cost
    ],
)
def test_tile_rule(width: int, height: int, tokens: int) -> None:
    assert media.tile_tokens(width, height) == tokens


@pytest.mark.parametrize("make", [png, jpeg, gif])
def test_image_size_from_a_data_url_header(make: Any) -> None:
    assert media.image_size(data_url(make(1024, 1024))) == (1024, 1024)
    part = {"type": "image_url", "image_url": {"url": data_url(make(2048, 4096))}}
    assert media.image_tokens(part) == 1105


def test_images_without_a_readable_size_cost_the_most() -> None:
    for url in ("https://example.invalid/x.png", data_url(b"not an image"), "data:,"):
        part = {"type": "image_url", "image_url": {"url": url, "detail": "high"}}
        assert media.image_tokens(part) == media.IMAGE_MAX_TOKENS
    low = {"type": "image_url", "image_url": {"url": data_url(png(4000, 4000)), "detail": "low"}}
    assert media.image_tokens(low) == 85


def test_files_and_audio_are_bounded_by_their_size() -> None:
    pdf = base64.b64encode(b"%PDF" + b"x" * 29_999).decode()  # 30,003 bytes: no padding
    part = {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{pdf}"}}
    assert media.file_tokens(part) == 30_003 // 3 + 1
    assert media.file_tokens({"type": "file", "file": {"file_id": "f1"}}) == 1445
    audio = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(b"a" * 64_000).decode()},
    }
    assert media.audio_tokens(audio) == 641


def _prompt(o200k: tiktoken.Encoding, **fields: Any) -> int:
    return count_chat_prompt(o200k, {"messages": [{"role": "user", "content": "hi"}], **fields})


def test_request_fields_without_published_rules_count_as_text(o200k: tiktoken.Encoding) -> None:
    base = _prompt(o200k)
    schema = {
        "name": "answer",
        "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
    }
    fmt = {"type": "json_schema", "json_schema": schema}
    assert _prompt(o200k, response_format=fmt) > base + 10
    assert _prompt(o200k, response_format={"type": "json_object"}) == base
    prediction = {"type": "content", "content": "the quick brown fox " * 10}
    assert _prompt(o200k, prediction=prediction) == base + count_text(o200k, prediction["content"])
    custom = {"type": "custom", "custom": {"name": "sql", "description": "run a query"}}
    assert _prompt(o200k, tools=[custom]) > base + 5


def test_nested_schema_text_is_counted(o200k: tiktoken.Encoding) -> None:
    def tool(inner: dict[str, Any]) -> list[dict[str, Any]]:
        params = {"type": "object", "properties": {"q": {"type": "object", "properties": inner}}}
        return [{"type": "function", "function": {"name": "f", "parameters": params}}]

    plain = _prompt(o200k, tools=tool({"x": {"type": "string"}}))
    described = {"x": {"type": "string", "description": "a long nested description " * 5}}
    titled = {"x": {"type": "string", "title": "X title", "examples": ["e1", "e2"], "default": "d"}}
    assert _prompt(o200k, tools=tool(described)) > plain + 20
    assert _prompt(o200k, tools=tool(titled)) > plain + 5


def test_counting_never_raises_and_falls_back_to_bytes(o200k: tiktoken.Encoding) -> None:
    counter = TokenCounter(o200k)
    spaces = " " * 1_000_000  # tiktoken's core panics on this (PanicException)
    assert counter.text(spaces) == 1_000_000
    assert counter.failed
    assert count_text(o200k, "hello world") == 2  # a plain counter still counts exactly
    bound = TokenCounter(None)
    assert bound.text("héllo") == 6 and bound.bounded and not bound.failed


def test_the_byte_bound_is_never_below_the_count(o200k: tiktoken.Encoding) -> None:
    body = {
        "messages": [{"role": "user", "content": "Grüße, 世界! " * 50, "name": "bob"}],
        "tools": [{"type": "function", "function": {"name": "f", "description": "d"}}],
    }
    assert count_chat_prompt(TokenCounter(None), body) >= count_chat_prompt(o200k, body)
    assert count_completion(TokenCounter(None), "日本語", [("f", "{}")]) >= count_completion(
        o200k, "日本語", [("f", "{}")]
    )


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_counting_in_pieces_gives_the_same_count(name: str) -> None:
    import random

    enc = EncodingRegistry().get(name)
    rng = random.Random(7)
    words = ["hello", "world", "Grüße", "世界", "x.", "1234", "  ", "\n", "don't", "éa", "ok!"]
    text = "".join(rng.choice(words) + rng.choice([" ", "", "\n", ", "]) for _ in range(60_000))
    assert len(text) > 3 * 65536
    assert TokenCounter(enc).text(text) == len(enc.encode_ordinary(text))
