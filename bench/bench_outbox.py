"""Outbox throughput: put+group commit alone, then with the publisher draining to the
JSON-lines sink. Prints one JSON document.

    python bench/bench_outbox.py [--events 20000] [--concurrency 200]
        [--flush-ms 0] [--batch-size 500] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.delivery.outbox import Outbox
from proxy.delivery.publisher import JsonLinesSink, OutboxPublisher


def payload(i: int) -> bytes:
    # Roughly the size of a real charge event.
    return orjson.dumps(
        {
            "event_id": f"evt-{i:012d}",
            "api_key_id": f"key-{i % 97}",
            "model": "gpt-4o-mini",
            "input_tokens": 812,
            "output_tokens": 233,
            "credits": "0.001234",
            "outcome": "completed",
            "ts": 1_700_000_000.0 + i,
        }
    )


async def run_puts(outbox: Outbox, events: int, concurrency: int) -> list[float]:
    """`concurrency` handlers, each putting its share one after another."""
    latencies: list[float] = []

    async def handler(worker: int) -> None:
        for i in range(worker, events, concurrency):
            t0 = time.perf_counter()
            await outbox.put_nowait(f"evt-{i:012d}", f"key-{i % 97}".encode(), payload(i))
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(handler(w) for w in range(concurrency)))
    return latencies


def pct(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100)[q - 1] * 1000, 3) if values else 0.0


async def bench_put(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    outbox = Outbox(
        workdir / "put.sqlite3",
        flush_interval=args.flush_ms / 1000,
    )
    await outbox.start()
    t0 = time.perf_counter()
    latencies = await run_puts(outbox, args.events, args.concurrency)
    elapsed = time.perf_counter() - t0
    committed = outbox.pending_count()
    await outbox.close()
    return {
        "events": args.events,
        "seconds": round(elapsed, 3),
        "events_per_s": round(args.events / elapsed),
        "committed": committed,
        "put_latency_ms_p50": pct(latencies, 50),
        "put_latency_ms_p99": pct(latencies, 99),
    }


async def bench_relay_sink(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    outbox = Outbox(
        workdir / "relay.sqlite3",
        flush_interval=args.flush_ms / 1000,
    )
    await outbox.start()
    sink = workdir / "events.jsonl"
    relay = OutboxPublisher(outbox, JsonLinesSink(sink), batch_size=args.batch_size)
    relay.start()
    t0 = time.perf_counter()
    latencies = await run_puts(outbox, args.events, args.concurrency)
    put_done = time.perf_counter() - t0
    pending_after_puts = outbox.pending_count()
    await relay.close(60.0)  # returns as soon as the relay has drained everything
    elapsed = time.perf_counter() - t0
    lines = sink.read_bytes().count(b"\n")
    return {
        "events": args.events,
        "puts_seconds": round(put_done, 3),
        "all_published_seconds": round(elapsed, 3),
        "events_per_s_end_to_end": round(args.events / elapsed),
        "put_latency_ms_p50": pct(latencies, 50),
        "put_latency_ms_p99": pct(latencies, 99),
        "pending_when_puts_done": pending_after_puts,
        "sink_lines": lines,
        "published": relay.published,
    }


async def main(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        workdir = Path(tmp)
        return {
            "config": {
                "events": args.events,
                "concurrency": args.concurrency,
                "flush_ms": args.flush_ms,
                "batch_size": args.batch_size,
                "loop": "uvloop" if args.uvloop else "asyncio",
            },
            "put_commit": await bench_put(args, workdir),
            "put_commit_relay_sink": await bench_relay_sink(args, workdir),
        }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--flush-ms", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--uvloop", action="store_true")
    ns = parser.parse_args()
    if ns.uvloop:
        import uvloop

        uvloop.install()
    print(json.dumps(asyncio.run(main(ns)), indent=2))
