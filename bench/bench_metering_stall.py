"""Event-loop lag while pathological requests are metered (issue 15).

Target: metering one request never stalls the others by more than ~50 ms. The proxy
and the fake upstream run in this process on one event loop; a ticker measures how
late a 1 ms sleep wakes up (the lag every other request on the loop would see)
while requests that need a local estimate (the upstream reports no usage) are
served, one scenario at a time:

  idle         nothing but the ticker (the floor of this machine)
  whitespace   a prompt of 1,000,000 characters of whitespace (tiktoken's core
               panics on it: the charge falls back to the byte bound)
  long-word    one 1,000,000-letter "word" (BPE is slow on it)
  prose-4mb    4 MB of ordinary text
  inline-ref   for comparison, the old behaviour: the whitespace prompt counted on
               the loop (what one such request cost everyone before)

Output: lag p50 / p99 / max in ms per scenario (the worst of --rounds), the request
latency, and the number of charge events (one per request: nothing is free). The
fake upstream shares the loop, so its own handling of a big body is in the figures.
Run: python -m bench.bench_metering_stall [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp.test_utils import TestServer

from proxy.billing.encodings import EncodingRegistry
from proxy.config import EnvSettings, parse_config
from proxy.devtools.fake_upstream import Behaviour, build_fake_app
from proxy.server.app import build_app

CONFIG = """
providers:
  fake: {{base_url: "{url}", stream_usage: false, timeouts: {{total: 120, first_byte: 120}}}}
price_rules:
  std: {{input: 1000, output: 2000}}
aliases:
  smart: {{provider: fake, model: m, price_rule: std}}
auth: {{mode: none}}
"""
SCENARIOS = {
    "whitespace": " \t" * 500_000,
    "long-word": "a" * 1_000_000,
    "prose-4mb": "the quick brown fox jumps over the lazy dog, again and again. " * 65_000,
}


async def ticker(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append((time.perf_counter() - t - 0.001) * 1000)


def summary(lags: list[float]) -> dict[str, float]:
    lags = sorted(lags) or [0.0]
    return {
        "p50_ms": round(statistics.median(lags), 2),
        "p99_ms": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 2),
        "max_ms": round(lags[-1], 2),
    }


async def measure(run: Any) -> dict[str, Any]:
    lags: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(lags, stop))
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    result = await run()
    took = (time.perf_counter() - started) * 1000
    await asyncio.sleep(0.05)
    stop.set()
    await tick
    return {**summary(lags), "request_ms": round(took, 1), **(result or {})}


def count_lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


async def main(rounds: int) -> None:
    encodings = EncodingRegistry()
    encodings.preload(["o200k_base"])
    fake = TestServer(build_fake_app(Behaviour(usage_in_body=False)), host="127.0.0.1")
    await fake.start_server()
    with tempfile.TemporaryDirectory(prefix="llm-proxy-stall-") as tmp:
        config = parse_config(
            yaml.safe_load(CONFIG.format(url=f"http://127.0.0.1:{fake.port}/v1")), "bench", {}
        )
        settings = EnvSettings(
            outbox_path=str(Path(tmp) / "outbox.sqlite3"), sink_path=str(Path(tmp) / "ev.jsonl")
        )
        proxy = TestServer(build_app(config, settings, encodings=encodings), host="127.0.0.1")
        await proxy.start_server()
        url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
        results: dict[str, Any] = {}
        async with aiohttp.ClientSession() as session:

            async def send(text: str) -> dict[str, Any]:
                body = {"model": "smart", "messages": [{"role": "user", "content": text}]}
                async with session.post(
                    url, data=orjson.dumps(body), headers={"X-User-Id": "1"}
                ) as resp:
                    await resp.read()
                    return {"status": resp.status}

            async def nothing() -> None:
                await asyncio.sleep(0.3)

            results["idle"] = await measure(nothing)
            for name, text in SCENARIOS.items():
                runs = [await measure(lambda t=text: send(t)) for _ in range(rounds)]
                results[name] = max(runs, key=lambda r: r["max_ms"])  # the worst round

            enc = encodings.get("o200k_base")

            async def inline() -> dict[str, Any]:
                await asyncio.sleep(0)
                try:
                    enc.encode_ordinary(SCENARIOS["whitespace"])
                except BaseException:
                    return {"raised": "PanicException"}
                return {}

            results["inline-ref"] = await measure(inline)
        await proxy.close()  # flushes the outbox to the sink
        # Every request is charged (never a free answer): one event each.
        results["charge_events"] = count_lines(Path(settings.sink_path))
        results["requests"] = rounds * len(SCENARIOS)
    await fake.close()
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args().rounds))
