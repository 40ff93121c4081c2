"""The ledger on its databases: events applied per second at batch sizes 1/100/1000 on
PostgreSQL and SQLite, `credits usage --period 30d` on a user with 1,000,000 entries
(read from the hourly rollups), and the Kafka consumer's lag under 1,000 events/s.
Prints one JSON document.

    python bench/bench_ledger.py [--quick] [--pg-url postgresql://...]
        [--usage-entries 1000000] [--lag-seconds 20] [--skip-lag]

Without --pg-url a throwaway PostgreSQL is started (tests/fixtures_postgres.py), and
the lag run starts the test Kafka broker (tansu, tests/fixtures_kafka.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.contract.charge_event import ChargeEvent
from proxy.delivery.kafka import create_topic, make_producer
from proxy.ledger.book import Book
from proxy.ledger.consumer import LedgerConsumer, LedgerSettings
from proxy.ledger.database import migrate, open_engine
from proxy.ledger.reads import Reader
from tests.fixtures_kafka import KafkaBroker
from tests.fixtures_postgres import PostgresServer
from tests.ledger_events import charge_event

USERS = 1000


@contextlib.contextmanager
def postgres(url: str | None) -> Iterator[PostgresServer]:
    server = PostgresServer(url)
    if not server.external:
        server.start()
    try:
        yield server
    finally:
        server.close()


@contextlib.asynccontextmanager
async def database(kind: str, pg: PostgresServer, workdir: Path) -> AsyncIterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / f'ledger-{uuid.uuid4().hex[:8]}.sqlite3'}"
        return
    name = f"bench_{uuid.uuid4().hex[:10]}"
    url = await pg.create_database(name)
    try:
        yield url
    finally:
        await pg.drop_database(name)


def events(n: int, users: int = USERS, start_ms: int | None = None, step_ms: int = 0) -> list:
    base = int(time.time() * 1000) if start_ms is None else start_ms
    return [charge_event(1 + i % users, 3, unix_ms=base + i * step_ms) for i in range(n)]


async def throughput(url: str, batch: int, n: int) -> dict[str, float]:
    engine = open_engine(url)
    try:
        await migrate(engine)
        book = Book(engine)
        todo = events(n)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            await book.apply_charges(todo[i : i + batch])
        elapsed = time.perf_counter() - t0
        return {"events": n, "seconds": round(elapsed, 3), "events_per_s": round(n / elapsed)}
    finally:
        await engine.dispose()


async def usage_query(url: str, entries: int) -> dict[str, float]:
    """One user with `entries` charges spread over 60 days, then the usage query."""
    engine = open_engine(url)
    try:
        await migrate(engine)
        book = Book(engine)
        start = int((datetime.now(UTC) - timedelta(days=60)).timestamp() * 1000)
        step = max(1, 60 * 86_400_000 // entries)
        t0 = time.perf_counter()
        for i in range(0, entries, 5000):
            size = min(5000, entries - i)
            batch = [
                charge_event(7, 1, alias=f"m{j % 4}", unix_ms=start + (i + j) * step)
                for j in range(size)
            ]
            await book.apply_charges(batch)
        fill_s = time.perf_counter() - t0
        reader = Reader(engine)
        timings: dict[str, list[float]] = {}
        for period in ("24h", "7d", "30d", "all"):
            runs = []
            for _ in range(20):
                t = time.perf_counter()
                await reader.usage(7, period)
                runs.append((time.perf_counter() - t) * 1000)
            timings[period] = runs
        got = await reader.usage(7, "all")
        assert got["requests"] == entries, got
        return {
            "entries": entries,
            "fill_seconds": round(fill_s, 1),
            **{f"usage_{p}_ms_p50": round(statistics.median(v), 2) for p, v in timings.items()},
        }
    finally:
        await engine.dispose()


async def consumer_lag(url: str, broker: KafkaBroker, rate: int, seconds: float) -> dict:
    """Produce `rate` events/s for `seconds`; sample produced - applied every 50 ms."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    await create_topic(broker.bootstrap, topic, partitions=3)
    engine = open_engine(url)
    await migrate(engine)
    consumer = LedgerConsumer(
        LedgerSettings(
            topic=topic,
            bootstrap=broker.bootstrap,
            group_id=f"bench-{topic}",
            idempotent_producer=False,
            poll_timeout_ms=50,
            session_timeout_ms=3000,
            rebalance_timeout_ms=500,
        ),
        Book(engine),
    )
    producer = make_producer(broker.bootstrap, idempotent=False)
    await producer.start()
    task = asyncio.create_task(consumer.run())
    produced = 0
    lags: list[int] = []
    try:
        # Wait for the group to form before the clock starts.
        warm: ChargeEvent = charge_event(1, 0)
        await producer.send_and_wait(topic, warm.to_json(), key=warm.kafka_key())
        while consumer.stats.applied < 1:
            await asyncio.sleep(0.05)
        total = int(rate * seconds)
        todo = events(total)
        t0 = time.perf_counter()
        next_sample = t0
        while produced < total:
            due = min(total, int((time.perf_counter() - t0) * rate))
            for e in todo[produced:due]:
                await producer.send(topic, e.to_json(), key=e.kafka_key())
            produced = max(produced, due)
            now = time.perf_counter()
            if now >= next_sample:
                lags.append(produced - (consumer.stats.applied - 1))
                next_sample = now + 0.05
            await asyncio.sleep(0.005)
        await producer.flush()
        while consumer.stats.applied - 1 < total:
            await asyncio.sleep(0.01)
        drained_s = time.perf_counter() - t0 - seconds
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 30)
        await producer.stop()
        await engine.dispose()
    lags.sort()
    return {
        "rate_per_s": rate,
        "seconds": seconds,
        "lag_events_p50": lags[len(lags) // 2],
        "lag_events_p99": lags[int(len(lags) * 0.99)],
        "lag_events_max": lags[-1],
        "lag_ms_p99": round(lags[int(len(lags) * 0.99)] / rate * 1000, 1),
        "drained_after_s": round(max(0.0, drained_s), 2),
    }


async def main(args: argparse.Namespace) -> dict:
    result: dict = {"throughput": {}, "usage": {}, "lag": {}}
    sizes = {1: 300, 100: 5000, 1000: 20000} if args.quick else {1: 2000, 100: 30000, 1000: 100000}
    entries = 20000 if args.quick else args.usage_entries
    with tempfile.TemporaryDirectory() as tmp, postgres(args.pg_url) as pg:
        for kind in ("postgresql", "sqlite"):
            for batch, n in sizes.items():
                async with database(kind, pg, Path(tmp)) as url:
                    result["throughput"][f"{kind}_batch_{batch}"] = await throughput(url, batch, n)
            async with database(kind, pg, Path(tmp)) as url:
                result["usage"][kind] = await usage_query(url, entries)
        if not args.skip_lag:
            broker = KafkaBroker()
            broker.start()
            try:
                for kind in ("postgresql", "sqlite"):
                    async with database(kind, pg, Path(tmp)) as url:
                        result["lag"][kind] = await consumer_lag(
                            url, broker, 1000, 5 if args.quick else args.lag_seconds
                        )
            finally:
                broker.close()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pg-url")
    parser.add_argument("--usage-entries", type=int, default=1_000_000)
    parser.add_argument("--lag-seconds", type=float, default=20.0)
    parser.add_argument("--skip-lag", action="store_true")
    print(orjson.dumps(asyncio.run(main(parser.parse_args())), option=orjson.OPT_INDENT_2).decode())
