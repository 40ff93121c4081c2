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

`--streams` counts the relay of a stream instead, per relayed event: the full
pipeline with metering on and off (`LLM_PROXY_METERING`), for a client that did not
ask for usage (strip: the proxy asks for it and cuts it out) and one that did (pass),
and the bare relay for scale. Streams of `--chunks` chunks `--interval-ms` apart, two
clients, so that each upstream read is one event (what `bench_metering` measures in
CPU time, which on a shared VM spreads by more than metering's effect).

Run: python -m bench.bench_callgrind [--quick] [--targets bare,relay,check,full]
     [--requests N] [--concurrency C]   (needs valgrind; not part of bench.run)
     python -m bench.bench_callgrind --streams [--targets strip-on,strip-off,...]
     [--requests N (streams)] [--chunks N] [--interval-ms MS]
     --keep DIR copies each target's dump there (callgrind_annotate DIR/callgrind.NAME)
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.stack import FULL_LIMITS, Stack, Target, run_on_stack

TARGETS = ("bare", "relay", "check", "full")
STREAM_TARGETS = ("strip-on", "strip-off", "pass-on", "pass-off", "bare")
MESSAGES = [{"role": "user", "content": "hello there, how are you?"}]


@dataclass(frozen=True)
class Load:
    """What each measured unit is: `n` requests, or `n` streams of `chunks` chunks."""

    n: int
    concurrency: int
    chunks: int = 0  # 0: small non-streamed requests
    interval_ms: float = 0.0
    include_usage: bool = False

    def body(self, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": MESSAGES}
        if self.chunks:
            body.update(
                stream=True, max_tokens=self.chunks, bench_chunk_interval_ms=self.interval_ms
            )
            if self.include_usage:
                body["stream_options"] = {"include_usage": True}
        return body

    @property
    def units(self) -> int:
        """What the total is divided by: requests, or relayed events (role chunk,
        content chunks, stop chunk, `[DONE]`)."""
        return self.n * (self.chunks + 3) if self.chunks else self.n


async def _load(target: Target, load: Load, n: int) -> None:
    sent = 0
    body = load.body(target.model)
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            nonlocal sent
            while sent < n:
                sent += 1
                async with session.post(target.url, json=body, headers=target.headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{target.name}: HTTP {r.status}")

        await asyncio.gather(*(client() for _ in range(load.concurrency)))


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


def _slow_config(stack: Stack, name: str, mode: str | None = None) -> Path:
    """The full pipeline's config with budgets for a proxy slowed ~50x: at the default
    ones most calls would fail open and the count would be the fail-open path's, not
    the pipeline's."""
    assert stack.config_path is not None
    config = stack.config_path.read_text() + FULL_LIMITS + "  budget_ms: 60000\n"
    guard = "guard: {hold_ttl_s: 0.2, budget_ms: 60000, provider_timeout_s: 60"
    if mode is not None:
        guard += f", mode: {mode}"
    path = stack.workdir / f"cg-{name}.yaml"
    path.write_text(config.replace("guard: {hold_ttl_s: 0.2", guard))
    return path


def _start(stack: Stack, name: str, wrap: list[str]) -> Target:
    if name == "bare":
        return stack.bare(wrap)
    if name == "relay":
        return stack.proxy("cg-relay", full=False, wrap=wrap)
    config = _slow_config(stack, name, "check" if name == "check" else None)
    return stack.proxy(f"cg-{name}", full=True, config=config, wrap=wrap)


def _start_streaming(stack: Stack, name: str, wrap: list[str]) -> Target:
    """`strip-on`, `pass-off`, ...: the full pipeline, metering on or off."""
    if name == "bare":
        return stack.bare(wrap)
    env = {"LLM_PROXY_METERING": name.split("-")[1]}
    config = _slow_config(stack, name)
    return stack.proxy(f"cg-{name}", full=True, config=config, extra_env=env, wrap=wrap)


def measure(
    stack: Stack, name: str, load: Load, warmup: int, keep: Path | None = None
) -> dict[str, Any]:
    out = stack.workdir / f"callgrind-{name}"
    wrap = ["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={out}.%p"]
    target = _start_streaming(stack, name, wrap) if load.chunks else _start(stack, name, wrap)
    assert target.proc is not None
    try:
        asyncio.run(_load(target, load, warmup))
        pid = str(target.proc.pid)
        subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
        started = time.monotonic()
        asyncio.run(_load(target, load, load.n))
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
        if keep is not None:  # for callgrind_annotate: where the instructions went
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(dumps[-1], keep / f"callgrind.{name}")
        fail_opens = asyncio.run(_fail_opens(target)) if name != "bare" else 0
    finally:
        stack.stop(target.proc)
    if load.chunks:
        return {
            "streams": load.n,
            "chunks": load.chunks,
            "concurrency": load.concurrency,
            "instructions_per_event": round(instructions / load.units),
            "seconds_under_valgrind": round(elapsed, 1),
            "fail_open_decisions": fail_opens,
        }
    return {
        "requests": load.n,
        "concurrency": load.concurrency,
        "k_instructions_per_request": round(instructions / load.units / 1000, 1),
        "seconds_under_valgrind": round(elapsed, 1),
        "fail_open_decisions": fail_opens,
    }


def run(
    stack: Stack, targets: list[str], requests: int, concurrency: int, keep: Path | None = None
) -> dict[str, Any]:
    load = Load(requests, concurrency)
    warmup = max(100, requests // 4)
    result = {name: measure(stack, name, load, warmup, keep) for name in targets}
    bare = result.get("bare")
    if bare is not None:
        for r in result.values():
            r["vs_bare"] = round(
                r["k_instructions_per_request"] / bare["k_instructions_per_request"], 3
            )
    return result


def run_streams(
    stack: Stack,
    targets: list[str],
    streams: int,
    chunks: int,
    interval_ms: float,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Instructions per relayed event; `vs_off`: metering on against off, same mode."""
    result: dict[str, Any] = {}
    for name in targets:
        load = Load(streams, 2, chunks, interval_ms, include_usage=name.startswith("pass"))
        result[name] = measure(stack, name, load, 2, keep)
    for name, r in result.items():
        off = result.get(name.replace("-on", "-off"))
        if name.endswith("-on") and off is not None:
            r["vs_off"] = round(r["instructions_per_event"] / off["instructions_per_event"], 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="instructions per request under callgrind")
    parser.add_argument("--quick", action="store_true", help="200 requests a target")
    parser.add_argument("--targets", default="")
    parser.add_argument(
        "--requests", type=int, default=None, help="requests (1000), or streams (16)"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--streams", action="store_true", help="count a stream's relay")
    parser.add_argument("--chunks", type=int, default=500)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument(
        "--keep", type=Path, default=None, help="copy each target's dump into this folder"
    )
    args = parser.parse_args()
    known = STREAM_TARGETS if args.streams else TARGETS
    targets = [t for t in (args.targets or ",".join(known)).split(",") if t]
    unknown = sorted(set(targets) - set(known))
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(known)}")
    if args.chunks < 1 or args.interval_ms < 0:
        parser.error("--chunks must be >= 1 and --interval-ms >= 0")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("needs valgrind (apt-get install valgrind)")
    if args.streams:
        streams = 4 if args.quick else (args.requests if args.requests is not None else 16)
        run_on_stack(
            lambda stack: run_streams(
                stack, targets, streams, args.chunks, args.interval_ms, args.keep
            )
        )
        return
    requests = 200 if args.quick else (args.requests if args.requests is not None else 1000)
    run_on_stack(lambda stack: run(stack, targets, requests, args.concurrency, args.keep))


if __name__ == "__main__":
    main()
