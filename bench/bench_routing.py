"""Traffic control costs: CPU per request with routing and rate limits on vs off, and
throughput while the primary target is down.

* cost: the full pipeline (Redis guard, paid alias) with one target and no `limits:`
  against the same alias with two weighted targets (both on the bench upstream) and
  `limits:` on every dimension (one admit script per request, one finish script for
  the concurrency slot and the token correction). Interleaved max-throughput rounds.
* outage: the primary target's port refuses connections, the backup (priority 1)
  is the bench upstream. With the default cooldown the primary is skipped after
  `allowed_fails`; with `allowed_fails: 0` (no cooldown) every request tries it first.
  Compared with no outage at all.

Run: python -m bench.bench_routing [--quick]
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.harness import free_port
from bench.stack import SERVICE_KEY, Stack, Target, timed_main
from proxy.contract.redis_keys import key_sha256

CONFIG = """
providers:
  bench: {{base_url: "http://127.0.0.1:{up}/v1", max_connections: 512}}
  bench2: {{base_url: "http://127.0.0.1:{up}/v1", max_connections: 512}}
  down: {{base_url: "http://127.0.0.1:{down}/v1", max_connections: 512,
         timeouts: {{connect: 1}}}}
price_rules:
  std: {{input: 1000, cached_input: 500, output: 2000}}
aliases:
  bench-paid:
    price_rule: std
    targets: {targets}
{routing}
auth:
  mode: keys
  service_keys:
    - {{name: bench, sha256: "{key}", scenes: ["*"]}}
{limits}
"""

ONE = "[{provider: bench, model: bench-model}]"
TWO = "[{provider: bench, model: bench-model, weight: 3}, {provider: bench2, model: bench-model}]"
OUTAGE = (
    "[{provider: down, model: bench-model, priority: 0},"
    " {provider: bench, model: bench-model, priority: 1}]"
)
LIMITS = "limits: {user: {rpm: 1000000000, tpm: 1000000000000, concurrency: 100000}}"


def _config(stack: Stack, name: str, targets: str, routing: str = "", limits: str = "") -> Path:
    path = stack.workdir / f"{name}.yaml"
    text = CONFIG.format(
        up=stack.upstream_port,
        down=free_port(),  # nothing listens there: connections are refused
        targets=targets,
        routing=f"    routing: {{{routing}}}" if routing else "",
        key=key_sha256(SERVICE_KEY),
        limits=limits,
    )
    path.write_text(textwrap.dedent(text))
    return path


def _proxy(stack: Stack, name: str, config: Path) -> Target:
    return stack.proxy(name, full=True, config=config)


def run(stack: Stack, seconds: float, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cost = {
        "off (one target, no limits)": _proxy(stack, "r-off", _config(stack, "off", ONE)),
        "routing only (two targets)": _proxy(stack, "r-routing", _config(stack, "rt", TWO)),
        "limits only (one target)": _proxy(
            stack, "r-limits", _config(stack, "lim", ONE, limits=LIMITS)
        ),
        "both (two targets, limits)": _proxy(
            stack, "r-on", _config(stack, "on", TWO, limits=LIMITS)
        ),
    }
    try:
        out["cost"] = scenarios.interleaved_max(cost, seconds, rounds)
    finally:
        for t in cost.values():
            stack.stop(t.proc)  # type: ignore[arg-type]
    outage = {
        "no outage": _proxy(stack, "o-none", _config(stack, "none", ONE)),
        "primary down, cooldown": _proxy(stack, "o-cool", _config(stack, "cool", OUTAGE)),
        "primary down, no cooldown": _proxy(
            stack, "o-nocool", _config(stack, "nocool", OUTAGE, routing="allowed_fails: 0")
        ),
    }
    try:
        out["outage"] = scenarios.interleaved_max(outage, seconds, rounds)
    finally:
        for t in outage.values():
            stack.stop(t.proc)  # type: ignore[arg-type]
    return out


def main() -> None:
    timed_main("routing and rate limits: cost and outage", run, 1.0, 5.0)


if __name__ == "__main__":
    main()
