"""This checkout against another revision: CPU per request at saturation, side by side.

    python -m bench.bench_revisions --base 3b04f83 [--seconds 6] [--rounds 5]

Checks the base revision out into a temporary git worktree and runs its proxy and
this one's with the same bench upstream, Redis and config, in interleaved rounds of
the max-throughput run (wrk, 64 connections), each proxy pinned to core 0 alone;
medians count. Relay only (free alias, no Redis) and full pipeline (guard, metering,
pricing, outbox). What a refactoring or an optimisation did to the proxy's own cost,
with the machine's drift shared by both sides.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import orjson

from bench import scenarios
from bench.harness import REPO
from bench.stack import Stack, Target


def run(stack: Stack, base_tree: Path, seconds: float, rounds: int) -> dict[str, Any]:
    targets: dict[str, Target] = {
        "base relay": stack.proxy("base-relay", full=False, source=base_tree),
        "head relay": stack.proxy("head-relay", full=False),
        "base full": stack.proxy("base-full", full=True, source=base_tree),
        "head full": stack.proxy("head-full", full=True),
    }
    bare = stack.bare()
    targets["bare"] = bare
    cpu: dict[str, list[float]] = {k: [] for k in targets}
    rps: dict[str, list[float]] = {k: [] for k in targets}
    try:
        for t in targets.values():
            scenarios.max_throughput(t, 1)  # warm-up
        for _ in range(rounds):
            for name, t in targets.items():
                r = scenarios.max_throughput(t, seconds)
                if r["cpu_ms_per_req"] is not None:
                    cpu[name].append(r["cpu_ms_per_req"])
                rps[name].append(r["rps"])
    finally:
        for t in targets.values():
            if t.proc is not None:
                stack.stop(t.proc)
    out: dict[str, Any] = {
        name: {
            "cpu_ms_per_req": round(statistics.median(cpu[name]), 4) if cpu[name] else None,
            "rps": round(statistics.median(rps[name])),
            "rounds_cpu": cpu[name],
        }
        for name in targets
    }
    for kind in ("relay", "full"):
        b, h = out[f"base {kind}"]["cpu_ms_per_req"], out[f"head {kind}"]["cpu_ms_per_req"]
        if b and h:
            out[f"{kind} change"] = f"{(h - b) / b * 100:+.1f} % CPU/request"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU per request: this checkout vs --base")
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm-proxy-rev-") as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.base],
            check=True,
            capture_output=True,
        )
        stack = Stack(Path(tmp) / "work")
        try:
            stack.start_base()
            result = run(stack, tree, args.seconds, args.rounds)
        finally:
            stack.close()
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                check=False,
                capture_output=True,
            )
    result["base"] = args.base
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
