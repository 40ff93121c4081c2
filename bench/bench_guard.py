"""CPU cost of CreditBalanceGuard.check(), with and without MGET coalescing.

Measures the common case (snapshot present, credit > 0: one Redis read) as
process CPU time per check (our process only, redis-server excluded) and wall
time, for 1 caller at a time and for 64 concurrent callers, on asyncio and uvloop.

    python bench/bench_guard.py [--checks 20000]

Starts its own redis-server on a free port unless REDIS_URL is set (then keys
go under a unique prefix and are deleted afterwards). Bounded: a fixed number
of checks per case, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis
import uvloop

from proxy.billing.guard import CreditBalanceGuard, GuardDecision
from proxy.billing.payer import BillingContext
from proxy.config import GuardConfig
from proxy.contract.redis_keys import RedisKeys, encode_snapshot
from tests.fixtures_redis import RedisServer

USERS = 1000


@dataclass(frozen=True, slots=True)
class Result:
    loop: str
    coalesce: bool
    concurrency: int
    cpu_us: float  # per check
    wall_us: float  # per check
    mgets_per_check: float
    fail_open: int  # budget overruns (scheduling hiccups on a busy machine); should be ~0


async def _seed(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    async with client.pipeline(transaction=False) as pipe:
        for user in range(1, USERS + 1):
            pipe.set(RedisKeys(prefix).snapshot(user), encode_snapshot(1_000_000), ex=3600)
        await pipe.execute()
    await client.aclose()


async def _cleanup(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def _mget_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


async def _case(url: str, prefix: str, coalesce: bool, concurrency: int, checks: int) -> Result:
    client = aioredis.Redis.from_url(url, max_connections=256)
    stats_client = aioredis.Redis.from_url(url)
    guard = CreditBalanceGuard(client, GuardConfig(prefix=prefix, coalesce=coalesce))
    contexts = [
        BillingContext.normalize(user_id=u, request_id="bench") for u in range(1, USERS + 1)
    ]
    rounds = max(1, checks // concurrency)

    fail_open = 0

    async def one_round(r: int) -> None:
        nonlocal fail_open
        base = r * concurrency
        batch = [contexts[(base + i) % USERS] for i in range(concurrency)]
        if concurrency == 1:
            decisions = [await guard.check(batch[0])]
        else:
            decisions = await asyncio.gather(*(guard.check(c) for c in batch))
        fail_open += decisions.count(GuardDecision.FAIL_OPEN)
        if any(d not in (GuardDecision.ALLOW, GuardDecision.FAIL_OPEN) for d in decisions):
            raise RuntimeError(f"unexpected decisions: {set(decisions)}")

    for r in range(min(rounds, 200)):  # warm-up: connections, script cache, code paths
        await one_round(r)
    fail_open = 0
    mgets_before = await _mget_calls(stats_client)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for r in range(rounds):
        await one_round(r)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    mgets = await _mget_calls(stats_client) - mgets_before
    await guard.close()
    await client.aclose()
    await stats_client.aclose()
    n = rounds * concurrency
    loop_name = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
    cpu_us, wall_us = (cpu1 - cpu0) / n * 1e6, (wall1 - wall0) / n * 1e6
    return Result(loop_name, coalesce, concurrency, cpu_us, wall_us, mgets / n, fail_open)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=20_000, help="checks per case")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per case, interleaved; the median is shown"
    )
    args = parser.parse_args()

    external = os.environ.get("REDIS_URL")
    server = RedisServer(external or None)
    if not server.external:
        server.start()
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    results: list[Result] = []
    loops: list[tuple[str, Callable[[], asyncio.AbstractEventLoop]]] = [
        ("asyncio", asyncio.new_event_loop),
        ("uvloop", uvloop.new_event_loop),
    ]
    try:
        asyncio.run(_seed(server.url, prefix))
        runs: dict[tuple[str, int, bool], list[Result]] = {}
        # Interleaved repeats and medians: a shared machine's noise hits all cases alike.
        for _ in range(args.repeat):
            for name, factory in loops:
                for concurrency in (1, 64):
                    for coalesce in (False, True):
                        case = _case(server.url, prefix, coalesce, concurrency, args.checks)
                        with asyncio.Runner(loop_factory=factory) as runner:
                            result = runner.run(case)
                        runs.setdefault((name, concurrency, coalesce), []).append(result)
        for rs in runs.values():
            results.append(sorted(rs, key=lambda r: r.cpu_us)[len(rs) // 2])
        asyncio.run(_cleanup(server.url, prefix))
    finally:
        server.close()

    print(
        f"redis-py with hiredis, common case (allow), {args.checks} checks per run, "
        f"median of {args.repeat} runs by CPU"
    )
    print(f"{'loop':8} {'concurrency':>11} {'coalesce':>9} {'CPU us/check':>13} "
          f"{'wall us/check':>14} {'MGET/check':>11} {'fail_open':>9}")  # fmt: skip
    for r in results:
        print(
            f"{r.loop:8} {r.concurrency:>11} {r.coalesce!s:>9} {r.cpu_us:>13.1f} "
            f"{r.wall_us:>14.1f} {r.mgets_per_check:>11.3f} {r.fail_open:>9}"
        )


if __name__ == "__main__":
    main()
