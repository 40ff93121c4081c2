"""uvloop on/off and hiredis on/off for the full-pipeline proxy: CPU per request.

Interleaved rounds of the max-throughput run (wrk, 64 connections) against proxies
that differ in one thing only, all pinned to core 0; the median round counts.
"without hiredis" hides the hiredis module from the proxy process, so redis-py
falls back to its pure-Python RESP parser.

Run: python -m bench.bench_variants [--quick]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import scenarios
from bench.stack import Stack, Target, timed_main


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
    try:
        return scenarios.interleaved_max(variants, seconds, rounds)
    finally:
        for t in variants.values():
            stack.stop(t.proc)  # type: ignore[arg-type]


def main() -> None:
    timed_main("uvloop / hiredis variants of the full proxy", run, 1.0, 6.0)


if __name__ == "__main__":
    main()
