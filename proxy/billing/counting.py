"""Counting that cannot fail: tiktoken when it works, a byte bound when it does not.

tiktoken's Rust core panics on some inputs (a few hundred thousand characters of
whitespace overflow its regex stack) and the panic reaches Python as
`pyo3_runtime.PanicException`, a BaseException that `except Exception` misses. A
count is part of a charge, so it must never raise: on any failure the text is
counted as its UTF-8 byte length, an upper bound (every token of an ordinary
encoding covers at least one byte), and the counter remembers that it fell back.

A counter without an encoding (`TokenCounter(None)`) only bounds: metering uses it
for inputs too large to count on the event loop (proxy.billing.estimate).
"""

from __future__ import annotations

import asyncio

import tiktoken


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
            return len(enc.encode_ordinary(text))
        except (KeyboardInterrupt, SystemExit, asyncio.CancelledError):
            raise
        except BaseException:  # noqa: BLE001 - PanicException is a BaseException
            self.failed = True
            return utf8_length(text)


def utf8_length(text: str) -> int:
    # surrogatepass: a lone surrogate (valid in a Python str) must still be counted.
    return len(text.encode("utf-8", "surrogatepass"))


def as_counter(enc: tiktoken.Encoding | TokenCounter | None) -> TokenCounter:
    return enc if isinstance(enc, TokenCounter) else TokenCounter(enc)
