"""Interpreter instructions per request of a whole proxy process, under callgrind.

CPU time on a shared (or virtual) machine moves by 10-30 % between runs of the same
code; instruction counts do not (two runs of the same revision agree to ~0.1 %).
Each target runs under `valgrind --tool=callgrind`; after a warm-up its counters
are zeroed (`callgrind_control -z`), a fixed number of small non-streamed requests
is sent by a closed loop of `concurrency` clients, and the counters are dumped
(`callgrind_control -d`): the dump's total over the requests is the figure. User
space only: the kernel's share (system calls) is not in it, so it complements the
CPU-time runs of `bench.run`, it does not replace them.

Targets: the bare aiohttp relay, the proxy relay only, and the full pipeline in
`guard.mode: check` and `reserve` (with rate limits, as `bench.run` measures it).

Run: python -m bench.bench_callgrind [--quick] [--targets bare,relay,check,full]
     [--requests N] [--concurrency C]   (needs valgrind; not part of bench.run)
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.stack import FULL_LIMITS, Stack, Target, run_on_stack

TARGETS = ("bare", "relay", "check", "full")
MESSAGES = [{"role": "user", "content": "hello there, how are you?"}]


async def _load(target: Target, n: int, concurrency: int) -> None:
    sent = 0
    body = {"model": target.model, "messages": MESSAGES}
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            nonlocal sent
            while sent < n:
                sent += 1
                async with session.post(target.url, json=body, headers=target.headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{target.name}: HTTP {r.status}")

        await asyncio.gather(*(client() for _ in range(concurrency)))


async def _fail_opens(target: Target) -> int:
    """Guard and rate-limit decisions that failed open (0 for a measured pipeline)."""
    url = target.url.split("/v1/")[0] + "/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        text = await r.text() if r.status == 200 else ""
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if 'result="fail_open"' in line and not line.startswith("#") and "_created" not in line
    )


def _total(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def _start(stack: Stack, name: str, wrap: list[str]) -> Target:
    if name == "bare":
        return stack.bare(wrap)
    if name == "relay":
        return stack.proxy("cg-relay", full=False, wrap=wrap)
    assert stack.config_path is not None
    # Budgets for a proxy slowed ~50x: at the default ones most calls would fail open
    # and the count would be the fail-open path's, not the pipeline's.
    config = stack.config_path.read_text() + FULL_LIMITS + "  budget_ms: 60000\n"
    guard = "guard: {hold_ttl_s: 0.2, budget_ms: 60000, provider_timeout_s: 60"
    config = config.replace("guard: {hold_ttl_s: 0.2", guard)
    if name == "check":
        config = config.replace(guard, guard + ", mode: check")
    path = stack.workdir / f"cg-{name}.yaml"
    path.write_text(config)
    return stack.proxy(f"cg-{name}", full=True, config=path, wrap=wrap)


def measure(stack: Stack, name: str, requests: int, concurrency: int) -> dict[str, Any]:
    out = stack.workdir / f"callgrind-{name}"
    wrap = ["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={out}.%p"]
    target = _start(stack, name, wrap)
    assert target.proc is not None
    try:
        asyncio.run(_load(target, max(100, requests // 4), concurrency))  # warm-up
        pid = str(target.proc.pid)
        subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
        started = time.monotonic()
        asyncio.run(_load(target, requests, concurrency))
        elapsed = time.monotonic() - started
        before = set(out.parent.glob(f"{out.name}.{pid}*"))
        subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
        deadline = time.monotonic() + 30
        dumps: list[Path] = []
        while not dumps and time.monotonic() < deadline:
            time.sleep(0.2)
            dumps = sorted(set(out.parent.glob(f"{out.name}.{pid}*")) - before)
        if not dumps:
            raise RuntimeError(f"{name}: callgrind wrote no dump")
        time.sleep(0.5)  # the dump is written in one go, but let it finish
        instructions = _total(dumps[-1])
        fail_opens = asyncio.run(_fail_opens(target)) if name != "bare" else 0
    finally:
        stack.stop(target.proc)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "k_instructions_per_request": round(instructions / requests / 1000, 1),
        "seconds_under_valgrind": round(elapsed, 1),
        "fail_open_decisions": fail_opens,
    }


def run(stack: Stack, targets: list[str], requests: int, concurrency: int) -> dict[str, Any]:
    result = {name: measure(stack, name, requests, concurrency) for name in targets}
    bare = result.get("bare")
    if bare is not None:
        for r in result.values():
            r["vs_bare"] = round(
                r["k_instructions_per_request"] / bare["k_instructions_per_request"], 3
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="instructions per request under callgrind")
    parser.add_argument("--quick", action="store_true", help="200 requests a target")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("needs valgrind (apt-get install valgrind)")
    requests = 200 if args.quick else args.requests
    run_on_stack(lambda stack: run(stack, targets, requests, args.concurrency))


if __name__ == "__main__":
    main()
