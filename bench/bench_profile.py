"""Where the proxy's CPU goes: py-spy profiles of the bare relay, the relay-only proxy
and the full pipeline, at saturation (wrk, 64 connections) and at a fixed rate.

    python -m bench.bench_profile [--seconds 8] [--rate 500] [--out DIR] [--top 25]

Each target runs pinned to core 0 alone (as in bench.run) while `py-spy record`
samples it (`--nonblocking` unless --blocking; `--native` off: time in C extensions
and the event loop's C code is charged to the Python frame that called it; the event
loop's own C work shows as self time of `run_app`). Prints, per target and load, the functions with
the most self time and the most inclusive time (share of samples), and writes the
collapsed stacks (`<out>/<target>-<load>.txt`, flamegraph.pl / speedscope input).
Needs py-spy (`pip install py-spy`) and ptrace rights (root, or --nonblocking).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.stack import Stack, Target


def _frame(raw: str) -> str:
    """'func (path/to/file.py:12)' -> 'func (file.py)'."""
    name, _, where = raw.partition(" (")
    file = where.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
    return f"{name} ({file})" if file else name


def summarise(collapsed: str, top: int) -> dict[str, Any]:
    """Self and inclusive shares of the samples of one collapsed-stack profile."""
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        # Skip the thread-name frame py-spy may put first.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n

    def share(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(v * 100 / total, 1)) for k, v in c.most_common(top)] if total else []

    return {"samples": total, "self": share(self_t), "inclusive": share(incl)}


def record(
    target: Target, load: Any, seconds: float, out: Path, rate: int, nonblocking: bool
) -> dict[str, Any]:
    assert target.proc is not None
    argv = [
        "py-spy", "record", "--pid", str(target.proc.pid), "--rate", str(rate),
        "--format", "raw", "--output", str(out), "--duration", str(int(seconds)),
    ]  # fmt: skip
    if nonblocking:
        argv.append("--nonblocking")
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # py-spy attached
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(load()))
    worker.start()
    worker.join()
    _, err = spy.communicate(timeout=seconds + 30)
    if spy.returncode != 0 and not out.exists():
        raise RuntimeError(f"py-spy failed: {err.decode()[-1000:]}")
    return result


def run(
    stack: Stack,
    seconds: float,
    rate: int,
    top: int,
    out: Path,
    sample_hz: int,
    nonblocking: bool = True,
) -> dict[str, Any]:
    targets = {
        "bare": stack.bare(),
        "relay": stack.proxy("relay", full=False),
        "full": stack.proxy("full", full=True),
    }
    report: dict[str, Any] = {}
    try:
        for t in targets.values():
            scenarios.max_throughput(t, 1)  # warm-up
        for name, t in targets.items():
            loads = {
                "max": lambda t=t: scenarios.max_throughput(t, seconds),
                f"{rate}rps": lambda t=t: scenarios.rate(t, rate, seconds, 0.5),
            }
            for load_name, load in loads.items():
                path = out / f"{name}-{load_name}.txt"
                res = record(t, load, seconds + 1, path, sample_hz, nonblocking)
                summary = summarise(path.read_text(), top) if path.exists() else {}
                summary["rps"] = res.get("rps")
                summary["cpu_ms_per_req"] = res.get("cpu_ms_per_req")
                report[f"{name} {load_name}"] = summary
    finally:
        for t in targets.values():
            if t.proc is not None:
                stack.stop(t.proc)
    return report


def markdown(report: dict[str, Any], top: int) -> str:
    lines = []
    for key, s in report.items():
        lines.append(
            f"### {key}: {s.get('samples')} samples, {s.get('rps')} req/s, "
            f"{s.get('cpu_ms_per_req')} ms CPU/req (under py-spy)\n"
        )
        lines.append("| self % | function | | inclusive % | function |")
        lines.append("|---:|---|---|---:|---|")
        rows = zip(s.get("self", [])[:top], s.get("inclusive", [])[:top], strict=False)
        for (fs, ps), (fi, pi) in rows:
            lines.append(f"| {ps} | `{fs}` | | {pi} | `{fi}` |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="py-spy profiles of bare / relay / full")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rate", type=int, default=500)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--hz", type=int, default=250, help="py-spy sampling rate")
    p.add_argument("--out", default=None, help="where the collapsed stacks go")
    p.add_argument(
        "--blocking",
        action="store_true",
        help="pause the target for each sample (exact stacks, but it slows the target)",
    )
    args = p.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    with tempfile.TemporaryDirectory(prefix="llm-proxy-prof-") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "profiles"
        out.mkdir(parents=True, exist_ok=True)
        stack = Stack(Path(tmp) / "work")
        try:
            stack.start_base()
            report = run(stack, args.seconds, args.rate, args.top, out, args.hz, not args.blocking)
        finally:
            stack.close()
    print(markdown(report, args.top))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
