"""What metering costs: relaying 500-chunk streams with metering on vs off.

Target (issue 3): metering adds <= 5% CPU to relaying a 500-chunk stream compared
with relaying it with metering switched off (LLM_PROXY_METERING=off, a
benchmark-only switch: nothing is charged then). Both proxies run the full
pipeline otherwise (auth, Redis guard, settle/outbox when metered), pinned to
core 0 and measured in alternating rounds (off/on, on/off, ...); the median round
counts.

Two client behaviours:
  strip   the client did not ask for usage: the proxy asks upstream for it and
          frames the stream into events to cut the usage chunk out (the default
          for most clients, and the costlier path);
  pass    the client asked for `include_usage`: reads pass through untouched and
          the usage event is found in the stream's tail at the end.

Reading the result: the meter's own per-chunk code is ~0.3 us (strip) / ~0.05 us (pass)
in-process; most of the remaining end-to-end difference comes from keeping the relayed
chunks alive for the fallback estimate (a throw-away variant that kept nothing measured
+0.75 % instead of +4.9 % in pass mode; README "Performance").

Run alone: python -m bench.bench_metering [--quick]   (part of python -m bench.run)
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from bench import scenarios
from bench.stack import Stack, run_on_stack

CONCURRENCY = 32
INTERVAL_MS = 2.0


def run(stack: Stack, plan: Any) -> dict[str, Any]:
    on = stack.proxy("meter-on", full=True)
    off = stack.proxy("meter-off", full=True, extra_env={"LLM_PROXY_METERING": "off"})
    out: dict[str, Any] = {
        "chunks": plan.metering_chunks,
        "concurrency": CONCURRENCY,
        "interval_ms": INTERVAL_MS,
    }
    try:
        for mode in ("strip", "pass"):
            rounds: dict[str, list[float]] = {"on": [], "off": []}
            for i in range(plan.metering_rounds):
                # off/on, then on/off: a drift of the box over the run (the rounds
                # spread by more than the effect) weighs on both alike.
                pair = (("off", off), ("on", on))
                for name, target in pair if i % 2 == 0 else pair[::-1]:
                    r = scenarios.streams(
                        target,
                        CONCURRENCY,
                        plan.metering_chunks,
                        INTERVAL_MS,
                        plan.metering_s,
                        plan.warmup_s,
                        include_usage=mode == "pass",
                    )
                    if r["cpu_us_per_chunk"] is not None:
                        rounds[name].append(r["cpu_us_per_chunk"])
            med = {k: statistics.median(v) if v else None for k, v in rounds.items()}
            overhead = (
                round((med["on"] - med["off"]) * 100 / med["off"], 2)
                if med["on"] is not None and med["off"]
                else None
            )
            out[mode] = {
                "cpu_us_per_chunk_on": med["on"],
                "cpu_us_per_chunk_off": med["off"],
                "rounds": rounds,
                "overhead_pct": overhead,
            }
    finally:
        stack.stop(on.proc)  # type: ignore[arg-type]
        stack.stop(off.proc)  # type: ignore[arg-type]
    return out


def main() -> None:
    from bench.run import QUICK, Plan

    parser = argparse.ArgumentParser(description="metering overhead on 500-chunk streams")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    plan = QUICK if args.quick else Plan()
    run_on_stack(lambda stack: run(stack, plan))


if __name__ == "__main__":
    main()
