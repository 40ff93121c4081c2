"""Token rules for the non-text parts of a prompt: images, files, audio.

None of these can be counted exactly offline, so each has a rule, and where the
size is unknown a bound that errs towards charging more:

* Images (OpenAI vision pricing, "Calculating costs", gpt-4o/gpt-4.1 family):
  `detail: low` costs 85 tokens. Otherwise (`high`, `auto`, absent) the image is
  scaled to fit in 2048x2048, then its shortest side to 768 px (never enlarged);
  it costs 85 + 170 per 512-px tile. The size is read from the image header when
  a data URL carries the image (PNG, GIF, JPEG, WebP); for a remote URL, or an
  unreadable header, the most any image can cost is charged: 2048x768 ->
  8 tiles -> 1,445 tokens.
* Files (`{"type": "file"}`, e.g. PDFs): their text is unknown without parsing
  them. Inline `file_data` counts one token per 3 decoded bytes (a PDF's text is
  smaller than the file), at least `FILE_MIN_TOKENS`; a `file_id` reference
  counts `FILE_MIN_TOKENS` (one high-detail page image; a lower bound for long
  documents, the size of which the proxy cannot see).
* Audio (`input_audio`): OpenAI bills ~10 tokens per second of audio; one token per
  100 decoded bytes is at least that for any encoding of 8 kbit/s or more.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Mapping
from typing import Any, Final

IMAGE_BASE_TOKENS: Final = 85  # all of a detail=low image; the base of any other
IMAGE_TILE_TOKENS: Final = 170
IMAGE_MAX_TOKENS: Final = IMAGE_BASE_TOKENS + 8 * IMAGE_TILE_TOKENS  # 2048x768: 8 tiles
FILE_MIN_TOKENS: Final = IMAGE_MAX_TOKENS
FILE_BYTES_PER_TOKEN: Final = 3
AUDIO_BYTES_PER_TOKEN: Final = 100
# Enough of a base64 payload to hold any common image header (JPEG's SOF may
# follow EXIF data): 64 KiB of base64 = 48 KiB decoded.
_HEADER_B64: Final = 65536


def image_tokens(part: Mapping[str, Any]) -> int:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, Mapping) else image
    detail = image.get("detail") if isinstance(image, Mapping) else None
    if detail == "low":
        return IMAGE_BASE_TOKENS
    size = image_size(url) if isinstance(url, str) else None
    if size is None:
        return IMAGE_MAX_TOKENS
    return tile_tokens(*size)


def tile_tokens(width: int, height: int) -> int:
    """OpenAI's high-detail rule for an image of `width` x `height` pixels."""
    if width <= 0 or height <= 0:
        return IMAGE_MAX_TOKENS
    w, h = float(width), float(height)
    fit = min(1.0, 2048 / max(w, h))
    w, h = w * fit, h * fit
    shrink = min(1.0, 768 / min(w, h))
    w, h = w * shrink, h * shrink
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


def file_tokens(part: Mapping[str, Any]) -> int:
    file = part.get("file")
    data = file.get("file_data") if isinstance(file, Mapping) else None
    if not isinstance(data, str):
        return FILE_MIN_TOKENS
    return max(FILE_MIN_TOKENS, _decoded_size(data) // FILE_BYTES_PER_TOKEN + 1)


def audio_tokens(part: Mapping[str, Any]) -> int:
    audio = part.get("input_audio")
    data = audio.get("data") if isinstance(audio, Mapping) else None
    if not isinstance(data, str):
        return 0
    return _decoded_size(data) // AUDIO_BYTES_PER_TOKEN + 1


def _payload(data: str) -> str:
    """The base64 payload of a data URL (or of bare base64)."""
    if data.startswith("data:"):
        comma = data.find(",")
        return data[comma + 1 :] if comma >= 0 else ""
    return data


def _decoded_size(data: str) -> int:
    return len(_payload(data)) * 3 // 4


def image_size(url: str) -> tuple[int, int] | None:
    """(width, height) from the header of a base64 data-URL image, else None."""
    if not url.startswith("data:") or ";base64," not in url[:100]:
        return None
    head = _payload(url)[:_HEADER_B64]
    head = head[: len(head) // 4 * 4]
    try:
        raw = base64.b64decode(head, validate=False)
    except (binascii.Error, ValueError):
        return None
    try:
        return _png(raw) or _gif(raw) or _webp(raw) or _jpeg(raw)
    except struct.error:
        return None


def _png(raw: bytes) -> tuple[int, int] | None:
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR":
        w, h = struct.unpack(">II", raw[16:24])
        return int(w), int(h)
    return None


def _gif(raw: bytes) -> tuple[int, int] | None:
    if raw[:6] in (b"GIF87a", b"GIF89a"):
        w, h = struct.unpack("<HH", raw[6:10])
        return int(w), int(h)
    return None


def _webp(raw: bytes) -> tuple[int, int] | None:
    if raw[:4] != b"RIFF" or raw[8:12] != b"WEBP":
        return None
    kind = raw[12:16]
    if kind == b"VP8X":
        w = int.from_bytes(raw[24:27], "little") + 1
        h = int.from_bytes(raw[27:30], "little") + 1
        return w, h
    if kind == b"VP8L":
        bits = int.from_bytes(raw[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 ":
        w, h = struct.unpack("<HH", raw[26:30])
        return int(w) & 0x3FFF, int(h) & 0x3FFF
    return None


def _jpeg(raw: bytes) -> tuple[int, int] | None:
    if raw[:2] != b"\xff\xd8":
        return None
    i = 2
    n = len(raw)
    while i + 9 < n:
        if raw[i] != 0xFF:
            i += 1
            continue
        marker = raw[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(raw[i + 2 : i + 4], "big")
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", raw[i + 5 : i + 9])
            return int(w), int(h)
        if length < 2:
            return None
        i += 2 + length
    return None
