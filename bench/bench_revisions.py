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
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import orjson

from bench import scenarios
from bench.harness import REPO
from bench.stack import PREFIX, USER_ID, Stack, Target
from proxy.contract.redis_keys import encode_snapshot


def _base_config(stack: Stack) -> Path:
    """The bench config without what an older revision may not know (alias fields
    added since, like allow_params; the max-throughput runs do not need them)."""
    assert stack.config_path is not None
    lines = stack.config_path.read_text().splitlines()
    kept = [ln for ln in lines if "allow_params" not in ln]
    # A flow mapping whose last entry was dropped keeps its closing brace.
    text = "\n".join(
        ln.rstrip().rstrip(",") + ("}" if ln.rstrip().endswith(",") else "") for ln in kept
    )
    path = stack.workdir / "bench_aliases_base.yaml"
    path.write_text(text + "\n")
    return path


def _seed_old_layout(stack: Stack) -> None:
    """Credit for the bench user under the key names revisions before the hash-tagged
    layout read (`credit:snapshot:<uid>`)."""
    import redis

    client = redis.Redis(port=stack.redis_port)
    client.set(f"{PREFIX}credit:snapshot:{USER_ID}", encode_snapshot(10**12))
    client.close()


def run(stack: Stack, base_tree: Path, seconds: float, rounds: int) -> dict[str, Any]:
    base_config = _base_config(stack)
    _seed_old_layout(stack)
    targets: dict[str, Target] = {
        "base relay": stack.proxy("base-relay", full=False, source=base_tree, config=base_config),
        "head relay": stack.proxy("head-relay", full=False),
        "base full": stack.proxy("base-full", full=True, source=base_tree, config=base_config),
        "head full": stack.proxy("head-full", full=True),
    }
    bare = stack.bare()
    targets["bare"] = bare
    try:
        out = scenarios.interleaved_max(targets, seconds, rounds)
    finally:
        for t in targets.values():
            if t.proc is not None:
                stack.stop(t.proc)
    for kind in ("relay", "full"):
        b, h = out[f"base {kind}"]["cpu_ms_per_req"], out[f"head {kind}"]["cpu_ms_per_req"]
        if b and h:
            out[f"{kind} change"] = f"{(h - b) / b * 100:+.1f} % CPU/request"
        b, h = out[f"base {kind}"]["cpu_ms_per_req_min"], out[f"head {kind}"]["cpu_ms_per_req_min"]
        if b and h:
            out[f"{kind} change (least)"] = f"{(h - b) / b * 100:+.1f} % CPU/request"
        bare = out["bare"]
        for side in ("base", "head"):
            mine = out[f"{side} {kind}"]
            if bare["cpu_ms_per_req_min"] and mine["cpu_ms_per_req_min"]:
                out[f"{side} {kind} / bare"] = {
                    "cpu (least)": round(
                        mine["cpu_ms_per_req_min"] / bare["cpu_ms_per_req_min"], 3
                    ),
                    "rps (most)": round(mine["rps_max"] / bare["rps_max"], 3),
                }
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
