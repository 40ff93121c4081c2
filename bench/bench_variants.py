"""uvloop on/off and hiredis on/off for the full-pipeline proxy: CPU per request.

Interleaved rounds of the max-throughput run (wrk, 64 connections) against proxies
that differ in one thing only, all pinned to core 0; the median round counts.
"without hiredis" hides the hiredis module from the proxy process, so redis-py
falls back to its pure-Python RESP parser.

Run: python -m bench.bench_variants [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import orjson

from bench import scenarios
from bench.stack import Stack, Target


def _no_hiredis_dir(workdir: Path) -> Path:
    d = workdir / "no-hiredis"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text('import sys\nsys.modules["hiredis"] = None\n')
    return d


def run(stack: Stack, seconds: float, rounds: int) -> dict[str, Any]:
    variants: dict[str, Target] = {}
    stack.loop = "uvloop"
    variants["uvloop + hiredis"] = stack.proxy("v-uvloop", full=True)
    env = stack.base_env()
    env["PYTHONPATH"] = f"{_no_hiredis_dir(stack.workdir)}:{env['PYTHONPATH']}"
    variants["uvloop, no hiredis"] = stack.proxy(
        "v-nohiredis", full=True, extra_env={"PYTHONPATH": env["PYTHONPATH"]}
    )
    stack.loop = "asyncio"
    variants["asyncio + hiredis"] = stack.proxy("v-asyncio", full=True)
    stack.loop = "uvloop"
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    rps: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for t in variants.values():
            scenarios.max_throughput(t, 1)  # warm-up
        for _ in range(rounds):
            for name, t in variants.items():
                r = scenarios.max_throughput(t, seconds)
                if r["cpu_ms_per_req"] is not None:
                    cpu[name].append(r["cpu_ms_per_req"])
                rps[name].append(r["rps"])
    finally:
        for t in variants.values():
            stack.stop(t.proc)  # type: ignore[arg-type]
    return {
        name: {
            "cpu_ms_per_req": statistics.median(cpu[name]) if cpu[name] else None,
            "rps": statistics.median(rps[name]),
            "rounds_cpu": cpu[name],
        }
        for name in variants
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="uvloop / hiredis variants of the full proxy")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm-proxy-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.start_base()
            result = run(stack, 1.0 if args.quick else 6.0, 1 if args.quick else 3)
        finally:
            stack.close()
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
