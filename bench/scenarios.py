"""One measurement each: a load shape against one target, with the target's CPU cost.

Every function returns a plain dict (it goes into latest.json as is).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
from typing import Any

import orjson

from bench.harness import REPO, pinned, python, run_json, tree_cpu_seconds
from bench.stack import LOAD_CORE, Target

SMALL_MESSAGES = [{"role": "user", "content": "Say hello in five words."}]


def body(target: Target, *, stream: bool = False, chunks: int = 0, interval_ms: float = 0) -> dict:
    b: dict[str, Any] = {"model": target.model, "messages": SMALL_MESSAGES}
    if stream:
        b.update(stream=True, max_tokens=chunks, bench_chunk_interval_ms=interval_ms)
    return b


class CpuMeter:
    """CPU seconds the target's process tree spent between start() and stop()."""

    def __init__(self, target: Target) -> None:
        self.pid = target.proc.pid if target.proc is not None else None
        self.before = 0.0

    def __enter__(self) -> CpuMeter:
        self.before = tree_cpu_seconds(self.pid) if self.pid else 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = round(tree_cpu_seconds(self.pid) - self.before, 3) if self.pid else None


def _per(cpu: float | None, n: int, scale: float) -> float | None:
    return round(cpu * scale / n, 4) if cpu is not None and n else None


def rate(target: Target, rps: int, duration_s: float, warmup_s: float) -> dict[str, Any]:
    spec = {
        "mode": "rate",
        "url": target.url,
        "headers": target.headers,
        "body": body(target),
        "rate": rps,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "concurrency": 256,
    }
    with CpuMeter(target) as cpu:
        out = run_json(
            pinned(LOAD_CORE, python("-m", "bench.loadgen", orjson.dumps(spec).decode()))
        )
    out["cpu_s"] = cpu.seconds
    out["cpu_ms_per_req"] = _per(cpu.seconds, out["completed_incl_warmup"], 1000)
    return out


def max_throughput(target: Target, duration_s: float, connections: int = 64) -> dict[str, Any]:
    """wrk (C, one thread on the load core): the most the target serves."""
    if shutil.which("wrk") is None:
        return closed_loop(target, duration_s, connections)
    env = dict(os.environ)
    env["BENCH_BODY"] = orjson.dumps(body(target)).decode()
    env["BENCH_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in target.headers.items())
    argv = pinned(
        LOAD_CORE,
        [
            "wrk", "-t1", f"-c{connections}", f"-d{max(1, math.ceil(duration_s))}s",
            "--timeout", "10s", "-s", str(REPO / "bench" / "wrk_post.lua"), target.url,
        ],
    )  # fmt: skip
    with CpuMeter(target) as cpu:
        raw = run_json(argv, env=env)
    n = raw["requests"]
    seconds = raw["duration_us"] / 1e6
    return {
        "generator": "wrk",
        "sent": n,
        "ok": n - raw["non2xx"] - raw["errors"],
        "errors": {"wrk": raw["errors"]} if raw["errors"] else {},
        "elapsed_s": round(seconds, 3),
        "rps": round(n / seconds, 1),
        "connections": connections,
        "latency_ms": {
            "p50": raw["p50_us"] / 1000,
            "p90": raw["p90_us"] / 1000,
            "p99": raw["p99_us"] / 1000,
            "max": raw["max_us"] / 1000,
            "n": n,
        },
        "cpu_s": cpu.seconds,
        "cpu_ms_per_req": _per(cpu.seconds, n, 1000),
    }


def closed_loop(target: Target, duration_s: float, connections: int) -> dict[str, Any]:
    """Fallback without wrk: the aiohttp client, `connections` requests in flight."""
    spec = {
        "mode": "closed",
        "url": target.url,
        "headers": target.headers,
        "body": body(target),
        "concurrency": connections,
        "duration_s": duration_s,
        "warmup_s": 0,
    }
    with CpuMeter(target) as cpu:
        out = run_json(
            pinned(LOAD_CORE, python("-m", "bench.loadgen", orjson.dumps(spec).decode()))
        )
    out.update(
        generator="aiohttp (wrk not installed)",
        connections=connections,
        cpu_s=cpu.seconds,
        cpu_ms_per_req=_per(cpu.seconds, out["completed_incl_warmup"], 1000),
    )
    return out


def streams(
    target: Target,
    concurrency: int,
    chunks: int,
    interval_ms: float,
    duration_s: float,
    warmup_s: float,
    *,
    include_usage: bool = False,
) -> dict[str, Any]:
    b = body(target, stream=True, chunks=chunks, interval_ms=interval_ms)
    if include_usage:
        b["stream_options"] = {"include_usage": True}
    spec = {
        "mode": "stream",
        "url": target.url,
        "headers": target.headers,
        "body": b,
        "concurrency": concurrency,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "stagger_s": min(duration_s / 2, chunks * interval_ms / 1000),
    }
    with CpuMeter(target) as cpu:
        out = run_json(
            pinned(LOAD_CORE, python("-m", "bench.loadgen", orjson.dumps(spec).decode()))
        )
    done = out["completed_incl_warmup"]
    events = done * (chunks + 3)  # role chunk + content chunks + stop chunk + [DONE]
    out.update(
        chunks=chunks,
        interval_ms=interval_ms,
        cpu_s=cpu.seconds,
        cpu_ms_per_stream=_per(cpu.seconds, done, 1000),
        cpu_us_per_chunk=_per(cpu.seconds, events, 1e6),
    )
    return out


def interleaved_max(targets: dict[str, Target], seconds: float, rounds: int) -> dict[str, Any]:
    """Max-throughput runs of several targets in alternating rounds (after one warm-up
    each), so the machine's drift is shared; the median round counts. The least CPU
    per request of any round is given too: other work on the box only ever adds to
    it, so on a shared machine the minimum is the steadier figure."""
    cpu: dict[str, list[float]] = {k: [] for k in targets}
    rps: dict[str, list[float]] = {k: [] for k in targets}
    for t in targets.values():
        max_throughput(t, 1)  # warm-up
    for _ in range(rounds):
        for name, t in targets.items():
            r = max_throughput(t, seconds)
            if r["cpu_ms_per_req"] is not None:
                cpu[name].append(r["cpu_ms_per_req"])
            rps[name].append(r["rps"])
    return {
        name: {
            "cpu_ms_per_req": round(statistics.median(cpu[name]), 4) if cpu[name] else None,
            "cpu_ms_per_req_min": min(cpu[name]) if cpu[name] else None,
            "rps": round(statistics.median(rps[name])),
            "rps_max": max(rps[name]),
            "rounds_cpu": cpu[name],
        }
        for name in targets
    }
