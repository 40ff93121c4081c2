"""guard.mode reserve vs check on the full pipeline: CPU and added latency per request.

Two proxies that differ only in `guard.mode` (both: Redis guard with its local cache,
a paid alias, metering, pricing, outbox), pinned to core 0, against the bench
upstream, at 500 RPS (open loop, latency percentiles) and at saturation (wrk,
64 connections, interleaved rounds; the median counts).

There is no ledger in the bench (charges go to a JSON-lines file), so nothing
releases settled holds; `hold_ttl_s: 0.2` stands in for a ledger that applies
charges ~200 ms after they are made (the user's hash then holds ~rate x 0.2 s
fields, which the reserve script scans).

Run: python -m bench.bench_reserve [--quick]
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import orjson

from bench import scenarios
from bench.stack import Stack, Target, timed_main

LEDGER_LAG_S = 0.2


def _config(stack: Stack, mode: str) -> Path:
    assert stack.config_path is not None
    extra = {"mode": mode, "hold_ttl_s": LEDGER_LAG_S} if mode == "reserve" else {"mode": mode}
    path = stack.workdir / f"bench_{mode}.yaml"
    base = stack.config_path.read_text().replace("guard: {hold_ttl_s: 0.2}\n", "")
    path.write_text(base + f"guard: {orjson.dumps(extra).decode()}\n")
    return path


def _rate_rounds(targets: dict[str, Target], rps: int, seconds: float, rounds: int) -> dict:
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
    for _ in range(rounds):
        for name, t in targets.items():
            runs[name].append(scenarios.rate(t, rps, seconds, warmup_s=1.0))
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        out[name] = {
            "cpu_ms_per_req": statistics.median(r["cpu_ms_per_req"] for r in rs),
            "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in rs),
            "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in rs),
            "errors": [r["errors"] for r in rs if r["errors"]],
        }
    return out


def run(stack: Stack, seconds: float, rounds: int) -> dict[str, Any]:
    targets = {
        mode: stack.proxy(f"guard-{mode}", full=True, config=_config(stack, mode))
        for mode in ("check", "reserve")
    }
    try:
        direct = scenarios.rate(stack.direct(), 500, seconds, warmup_s=1.0)
        at_500 = _rate_rounds(targets, 500, seconds, rounds)
        for row in at_500.values():
            row["added_p50_ms"] = round(row["p50_ms"] - direct["latency_ms"]["p50"], 3)
            row["added_p99_ms"] = round(row["p99_ms"] - direct["latency_ms"]["p99"], 3)
        saturation = scenarios.interleaved_max(targets, seconds, rounds)
    finally:
        for t in targets.values():
            stack.stop(t.proc)  # type: ignore[arg-type]
    diff = {
        "cpu_ms_per_req_at_500": round(
            at_500["reserve"]["cpu_ms_per_req"] - at_500["check"]["cpu_ms_per_req"], 4
        ),
        "added_p50_ms_at_500": round(at_500["reserve"]["p50_ms"] - at_500["check"]["p50_ms"], 3),
        "cpu_ms_per_req_at_saturation": round(
            (saturation["reserve"]["cpu_ms_per_req"] or 0)
            - (saturation["check"]["cpu_ms_per_req"] or 0),
            4,
        ),
        "rps_at_saturation": saturation["reserve"]["rps"] - saturation["check"]["rps"],
    }
    return {
        "direct_500": direct["latency_ms"],
        "at_500_rps": at_500,
        "saturation": saturation,
        "reserve_minus_check": diff,
    }


def main() -> None:
    timed_main("guard.mode reserve vs check", run, 2.0, 8.0)


if __name__ == "__main__":
    main()
