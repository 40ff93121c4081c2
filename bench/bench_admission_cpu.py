"""CPU of the Redis admission work alone, per request, against a real redis-server.

No HTTP and no upstream: the per-request calls the full pipeline makes on Redis
(reservation, rate-limit admit, settlement, rate-limit finish), from `--concurrency`
tasks paced to `--rps` in total, one user (as bench_reserve does), hold_ttl_s 0.2
(a ledger applying each charge ~200 ms after it was made: ~rps x 0.2 live holds).

Reports, per request: this process's CPU (time.process_time), redis-server's CPU
(INFO used_cpu_user + used_cpu_sys) and Redis commands (INFO commandstats calls).
Both CPU times are measured, not wall clock, so a busy box changes them little.

Run: python -m bench.bench_admission_cpu [--requests N] [--rps R] [--rounds K]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from proxy.billing.guard import CreditBalanceGuard
from proxy.billing.hold import Hold
from proxy.billing.limits import RateLimiter
from proxy.billing.payer import BillingContext
from proxy.billing.reservations import RedisReservations
from proxy.config.model import GuardConfig, LimitsConfig, LimitSet
from proxy.contract.redis_keys import RedisKeys, encode_snapshot

USER = 42
PREFIX = "bench:"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _redis_cpu(client: aioredis.Redis) -> tuple[float, int]:
    info = await client.info("cpu")
    stats = await client.info("commandstats")
    calls = sum(int(v["calls"]) for v in stats.values() if isinstance(v, dict))
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"]), calls


async def _round(
    url: str, n: int, rps: float, concurrency: int, batch: int = 0
) -> dict[str, float]:
    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=0.5, socket_timeout=1.0, health_check_interval=0,
        max_connections=256,
    )  # fmt: skip
    admin = aioredis.Redis.from_url(url)
    gconf = GuardConfig(prefix=PREFIX, hold_ttl_s=0.2, budget_ms=1000)
    guard = CreditBalanceGuard(client, gconf)
    res = RedisReservations(guard, gconf)
    big = LimitSet(rpm=1_000_000_000, tpm=1_000_000_000_000, concurrency=100_000)
    limits = LimitsConfig(
        user=big, key=LimitSet(rpm=1_000_000_000, concurrency=100_000), enabled=True
    )
    limiter = RateLimiter(client, limits, PREFIX)
    keys = RedisKeys(PREFIX)
    await admin.set(keys.snapshot(USER), encode_snapshot(10**15))
    res.start()
    await asyncio.sleep(0.5)  # scripts loaded, cache subscribed

    counter = [0]
    interval = concurrency / rps if rps > 0 else 0.0

    async def one(i: int) -> None:
        rid = f"req-{i}-{time.monotonic_ns()}"
        ctx = BillingContext(USER, "bench", rid, None, False, "bench")
        hold = Hold(USER, rid)
        await res.reserve(hold, 450, 0)
        adm = await limiter.admit(ctx, 500, rid)
        await asyncio.sleep(0)  # the upstream call
        res.settle(hold, 160)
        limiter.finish(adm, 200, rid)

    async def worker(w: int, count: int, start: float) -> None:
        for k in range(count):
            at = start + k * interval + w * interval / concurrency
            delay = at - time.monotonic()
            if interval and delay > 0:
                await asyncio.sleep(delay)
            await one(w * 1_000_000 + k)
            counter[0] += 1

    async def finish(
        cpu: tuple[float, float],
        wall: tuple[float, float],
        redis_cpu: tuple[float, float],
        cmds: tuple[int, int],
        done: int,
        live: int,
    ) -> dict[str, float]:
        await limiter.close()
        await res.close()
        await client.aclose()
        await admin.flushall()
        await admin.aclose()
        return {
            "proxy_cpu_us_per_req": round((cpu[1] - cpu[0]) / done * 1e6, 1),
            # redis-server's CPU includes the INFO calls (negligible) and its own cron.
            "redis_cpu_us_per_req": round((redis_cpu[1] - redis_cpu[0]) / done * 1e6, 1),
            "redis_cmds_per_req": round((cmds[1] - cmds[0] - 2) / done, 3),
            "rps": round(done / (wall[1] - wall[0])),
            "live_holds_at_end": live,
        }

    async def lockstep(count: int) -> None:
        # `batch` requests at once, then wait for their settlements: each step's
        # calls share one tick, so the batches are the same on every run.
        for k in range(count // batch):
            await asyncio.gather(*(one(k * batch + i) for i in range(batch)))
            while limiter.pending or res._settles.pending:
                await asyncio.sleep(0.0005)  # a poll costs a few us, a spin would not
            counter[0] += batch

    if batch:
        await lockstep(batch * 20)
        await asyncio.sleep(0.3)
        r0, c0 = await _redis_cpu(admin)
        p0, t0 = time.process_time(), time.monotonic()
        await lockstep(n)
        p1, t1 = time.process_time(), time.monotonic()
        r1, c1 = await _redis_cpu(admin)
        done = n // batch * batch
        return await finish((p0, p1), (t0, t1), (r0, r1), (c0, c1), done, 0)

    # warm-up
    await asyncio.gather(*(worker(w, 5, time.monotonic()) for w in range(concurrency)))
    await asyncio.sleep(0.3)
    r0, c0 = await _redis_cpu(admin)
    p0, t0 = time.process_time(), time.monotonic()
    per = n // concurrency
    await asyncio.gather(*(worker(w, per, t0) for w in range(concurrency)))
    for _ in range(200):
        if not (limiter.pending or res._settles.pending):
            break
        await asyncio.sleep(0.001)
    p1, t1 = time.process_time(), time.monotonic()
    r1, c1 = await _redis_cpu(admin)
    live = await admin.hlen(keys.holds(USER))
    return await finish((p0, p1), (t0, t1), (r0, r1), (c0, c1), per * concurrency, live)


async def _main(args: argparse.Namespace) -> None:
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    binary = shutil.which("redis-server") or "redis-server"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        probe = aioredis.Redis.from_url(url)
        for _ in range(100):
            with contextlib.suppress(Exception):
                await probe.ping()
                break
            await asyncio.sleep(0.05)
        await probe.aclose()
        rows = [
            await _round(url, args.requests, args.rps, args.concurrency, args.batch)
            for _ in range(args.rounds)
        ]
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    out: dict[str, Any] = {
        k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "live_holds_at_end"
    }
    out["live_holds_at_end"] = [r["live_holds_at_end"] for r in rows]
    out["rounds"] = rows
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=12000)
    p.add_argument("--rps", type=float, default=1500, help="0: as fast as it goes")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--batch", type=int, default=0, help="lockstep: this many requests at once, repeated"
    )
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    args = p.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(_main(args))
    else:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
