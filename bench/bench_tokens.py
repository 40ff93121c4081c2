"""Token counting benchmark: one-time load cost and fallback counting throughput.

Run: python -m bench.bench_tokens  (prints timings; asserts nothing)
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from proxy.billing.encodings import SUPPORTED_ENCODINGS, EncodingRegistry
from proxy.billing.tokens import count_chat_prompt, count_completion, count_text


def _best_of(n: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    for name in SUPPORTED_ENCODINGS:
        start = time.perf_counter()
        EncodingRegistry().get(name)
        print(f"load {name}: {time.perf_counter() - start:.3f} s (fresh registry)")

    registry = EncodingRegistry()
    registry.preload(SUPPORTED_ENCODINGS)
    rng = random.Random(7)
    words = ["token", "billing", "proxy", "the", "of", "数据", "🙂", "42", "\n", "fn()"]
    text = " ".join(rng.choice(words) for _ in range(20_000))
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "description": "Does a thing with some parameters",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
                    "required": ["a"],
                },
            },
        }
        for i in range(10)
    ]
    body = {
        "messages": [{"role": "system", "content": "You are helpful."}]
        + [
            {
                "role": "user" if i % 2 == 0 else "assistant",
                "content": text[i * 500 : i * 500 + 500],
            }
            for i in range(20)
        ],
        "tools": tools,
    }
    for name in SUPPORTED_ENCODINGS:
        enc = registry.get(name)
        t = _best_of(5, lambda enc=enc: count_text(enc, text))
        print(f"{name} count_text {len(text.encode()) / 1024:.0f} KiB: {t * 1000:.1f} ms")
        t = _best_of(20, lambda enc=enc: count_chat_prompt(enc, body))
        print(f"{name} count_chat_prompt (21 msgs, 10 tools): {t * 1000:.2f} ms")
        t = _best_of(20, lambda enc=enc: count_completion(enc, text[:4000], [("f", '{"a": 1}')]))
        print(f"{name} count_completion (4k chars): {t * 1000:.2f} ms")


if __name__ == "__main__":
    main()
