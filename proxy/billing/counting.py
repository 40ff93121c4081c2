"""Counting that cannot fail: tiktoken when it works, a byte bound when it does not.

tiktoken's Rust core panics on some inputs (a few hundred thousand characters of
whitespace overflow its regex stack) and the panic reaches Python as
`pyo3_runtime.PanicException`, a BaseException that `except Exception` misses. A
count is part of a charge, so it must never raise: on any failure the text is
counted as its UTF-8 byte length, an upper bound (every token of an ordinary
encoding covers at least one byte), and the counter remembers that it fell back.

Long texts are counted in pieces of about `PIECE_CHARS`, cut just before a space that
starts a word (" word" is one pre-token of both cl100k_base and o200k_base, and BPE
never merges across pre-tokens, so the pieces add up to the same count). That keeps
each tokenizer call short: counting off the event loop then holds the GIL for
tens of microseconds at a time instead of building a million-element list at once.

A counter without an encoding (`TokenCounter(None)`) only bounds: metering uses it
for inputs too large to count on the event loop (proxy.billing.estimate).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import tiktoken

PIECE_CHARS = 65536
# tiktoken's core overflows its regex stack on whitespace runs somewhere past 500,000
# characters (measured: 500,000 count, 1,000,000 panic) and prints a Rust backtrace
# while doing so, which stalls the process for ~0.3 s. Runs this long are never
# handed to it: they are counted as their bytes, like a failure.
_LONG_WHITESPACE = re.compile(r"\s{262144}")


class TokenCounter:
    """Counts text for one estimate; `failed` and `bounded` say whether any count was
    replaced by the byte bound (after a failure / because the counter only bounds)."""

    __slots__ = ("enc", "failed")

    def __init__(self, enc: tiktoken.Encoding | None) -> None:
        self.enc = enc
        self.failed = False

    @property
    def bounded(self) -> bool:
        return self.enc is None

    def text(self, text: str) -> int:
        if not text:
            return 0
        enc = self.enc
        if enc is None:
            return utf8_length(text)
        try:
            if len(text) <= PIECE_CHARS:
                return len(enc.encode_ordinary(text))
            return sum(self._piece(enc, piece) for piece in pieces(text))
        except (KeyboardInterrupt, SystemExit, asyncio.CancelledError):
            raise
        except BaseException:
            self.failed = True
            return utf8_length(text)

    def _piece(self, enc: tiktoken.Encoding, piece: str) -> int:
        if len(piece) > PIECE_CHARS and _LONG_WHITESPACE.search(piece):
            self.failed = True
            return utf8_length(piece)
        return len(enc.encode_ordinary(piece))


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` cut into pieces of at most ~`size` chars at pre-token boundaries; a
    stretch without one (a run of whitespace, a base64 blob) stays whole."""
    start = 0
    n = len(text)
    while n - start > size:
        cut = _last_boundary(text, start + size // 2, start + size)
        if cut < 0:
            cut = _next_boundary(text, start + size)
            if cut < 0:
                break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _last_boundary(text: str, lo: int, hi: int) -> int:
    """The last pre-token boundary in (lo, hi), or -1."""
    p = text.rfind(" ", lo + 1, hi)
    while p >= 0:
        if _is_boundary(text, p):
            return p
        p = text.rfind(" ", lo + 1, p)
    return -1


def _next_boundary(text: str, lo: int) -> int:
    """The first pre-token boundary after lo, or -1."""
    p = text.find(" ", lo + 1)
    while p >= 0:
        if _is_boundary(text, p):
            return p
        p = text.find(" ", p + 1)
    return -1


def _is_boundary(text: str, p: int) -> bool:
    """A space with a non-space before it and a letter after it starts a pre-token."""
    return p + 1 < len(text) and not text[p - 1].isspace() and text[p + 1].isalpha()


def utf8_length(text: str) -> int:
    # surrogatepass: a lone surrogate (valid in a Python str) must still be counted.
    return len(text.encode("utf-8", "surrogatepass"))


def as_counter(enc: tiktoken.Encoding | TokenCounter | None) -> TokenCounter:
    return enc if isinstance(enc, TokenCounter) else TokenCounter(enc)
