"""Load generator (own process, aiohttp client on uvloop): fixed-rate and streaming runs.

Max-throughput runs use wrk (see `bench/wrk_post.lua`; this client's "closed" mode
is the fallback where wrk is not installed); this client does what wrk cannot: a
fixed request rate (open loop: request i is sent at t0 + i/rate whatever the
previous ones are doing) and time to first token of streamed replies. Latency is
measured from just before the request is written to the end of its body
(non-streaming) or to the first body chunk (TTFT).

Run: python -m bench.loadgen '<json spec>'   (prints one JSON object)
spec: {"mode": "rate"|"stream"|"closed", "url": ..., "headers": {...}, "body": {...},
       "rate": RPS, "concurrency": N, "duration_s": S, "warmup_s": S}
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

import aiohttp
import orjson


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds (values are seconds)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "n": 0}
    s = sorted(values)
    n = len(s)

    def pick(q: float) -> float:
        return round(s[min(n - 1, int(q * n))] * 1000, 3)

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": pick(1.0), "n": n}


class Run:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.url: str = spec["url"]
        self.headers = {"Content-Type": "application/json", **spec.get("headers", {})}
        self.body = orjson.dumps(spec["body"])
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.chunks = 0
        self.recording = False
        self.completed = 0  # including warm-up: what the target's CPU was spent on

    def _error(self, what: str) -> None:
        if self.recording:
            self.errors[what] = self.errors.get(what, 0) + 1

    async def one(self, session: aiohttp.ClientSession) -> None:
        start = time.perf_counter()
        recording = self.recording
        try:
            async with session.post(self.url, data=self.body, headers=self.headers) as resp:
                if resp.status != 200:
                    await resp.read()
                    self._error(f"http_{resp.status}")
                    return
                if self.spec["mode"] == "stream":
                    first: float | None = None
                    reads = 0
                    async for _ in resp.content.iter_any():
                        if first is None:
                            first = time.perf_counter()
                        reads += 1
                    if recording and first is not None:
                        self.ttfts.append(first - start)
                        self.chunks += reads
                else:
                    await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._error(type(exc).__name__)
            return
        self.completed += 1
        if recording:
            self.latencies.append(time.perf_counter() - start)
            self.ok += 1

    async def rate(self, session: aiohttp.ClientSession, rate: float, seconds: float) -> int:
        """Open loop at `rate` for `seconds`; returns how many were sent."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        t0 = loop.time()
        total = int(rate * seconds)
        for i in range(total):
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(self.one(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        return total

    async def closed(self, session: aiohttp.ClientSession, conc: int, seconds: float) -> None:
        """`conc` clients, each sending its next request when the last one ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        stagger = float(self.spec.get("stagger_s", 0.0))

        async def worker() -> None:
            # Spread the first requests over one stream's duration so the run
            # measures a steady state, not `conc` simultaneous connects.
            await asyncio.sleep(random.random() * stagger)
            while loop.time() < deadline:
                await self.one(session)

        await asyncio.gather(*(worker() for _ in range(conc)))


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    run = Run(spec)
    conc = int(spec.get("concurrency", 256))
    connector = aiohttp.TCPConnector(limit=max(conc, 64), limit_per_host=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warmup = float(spec.get("warmup_s", 1.0))
        if spec["mode"] == "rate":
            if warmup:
                await run.rate(session, spec["rate"], warmup)
            run.recording = True
            start = time.perf_counter()
            sent = await run.rate(session, spec["rate"], spec["duration_s"])
        else:
            if warmup:
                await run.closed(session, min(conc, 8), warmup)
            run.recording = True
            start = time.perf_counter()
            await run.closed(session, conc, spec["duration_s"])
            sent = run.ok + sum(run.errors.values())
        elapsed = time.perf_counter() - start
    result: dict[str, Any] = {
        "sent": sent,
        "ok": run.ok,
        "errors": run.errors,
        "completed_incl_warmup": run.completed,
        "elapsed_s": round(elapsed, 3),
        "rps": round(run.ok / elapsed, 1) if elapsed else 0.0,
        "latency_ms": percentiles(run.latencies),
    }
    if spec["mode"] == "stream":
        result["ttft_ms"] = percentiles(run.ttfts)
        result["reads"] = run.chunks
    return result


if __name__ == "__main__":
    spec = orjson.loads(sys.argv[1])
    try:
        import uvloop

        out = uvloop.run(main(spec))
    except ImportError:  # pragma: no cover
        out = asyncio.run(main(spec))
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
