"""The processes under test: bench upstream, Redis, bare relay, proxy (relay-only and full).

Core layout (2-core box): everything measured (proxy, bare relay) on core 0 alone;
upstream, Redis and the load generators on core 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.harness import REPO, Proc, free_port, pinned, python
from proxy.contract.redis_keys import key_sha256 as hash_key

SERVICE_KEY = "sk-bench-service-key"
USER_ID = 42
PREFIX = "llmproxy:"
PROXY_CORE = "0"
LOAD_CORE = "1"

CONFIG = """
providers:
  bench:
    base_url: http://127.0.0.1:{upstream_port}/v1
    stream_usage: true
    max_connections: 512
price_rules:
  std: {{input: 1000, cached_input: 500, output: 2000}}
aliases:
  # bench_chunk_interval_ms: read only by the bench upstream (its chunk pacing).
  bench-paid: {{provider: bench, model: bench-model, price_rule: std,
               allow_params: [bench_chunk_interval_ms]}}
  bench-free: {{provider: bench, model: bench-model, free: true,
               allow_params: [bench_chunk_interval_ms]}}
auth:
  mode: keys
  service_keys:
    - name: bench
      sha256: "{key_hash}"
      scenes: ["*"]
# No ledger in the bench (charges go to a JSON-lines file), so nothing releases the
# settled holds of guard.mode reserve: they expire as if a ledger applied each
# charge ~200 ms after it was made (else user 42's holds would pile up for 900 s).
guard: {{hold_ttl_s: 0.2}}
"""

# The full pipeline runs with rate limits on (issue 23 measures it so), limits far
# above what a run can reach: their cost is measured, never a refusal.
FULL_LIMITS = """
limits:
  user: {rpm: 1000000000, tpm: 1000000000000, concurrency: 100000}
  key: {rpm: 1000000000, concurrency: 100000}
"""


@dataclass(frozen=True, slots=True)
class Target:
    """One thing the load generator can hit, and the process whose CPU it costs."""

    name: str
    url: str  # full chat/completions URL
    model: str
    headers: dict[str, str]
    proc: Proc | None  # None for the upstream itself (direct)


@dataclass
class Stack:
    workdir: Path
    loop: str = "uvloop"  # the proxy's --loop (and the bare relay's)
    log_level: str = "info"
    procs: list[Proc] = field(default_factory=list)
    upstream_port: int = 0
    redis_port: int = 0
    config_path: Path | None = None
    full_config_path: Path | None = None  # config_path + FULL_LIMITS (needs Redis)

    # -- pieces ------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "CREDIT_SNAPSHOT_URL")
        }
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        return env

    def _start(self, proc: Proc, wait_s: float = 20.0) -> Proc:
        self.procs.append(proc)
        return proc.start(wait_s)

    def start_base(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.upstream_port = free_port()
        self._start(
            Proc(
                "upstream",
                pinned(
                    LOAD_CORE, python("-m", "bench.upstream", "--port", str(self.upstream_port))
                ),
                self.base_env(),
                self.workdir / "upstream.log",
                self.upstream_port,
            )
        )
        if shutil.which("redis-server"):
            self.redis_port = free_port()
            self._start(
                Proc(
                    "redis",
                    pinned(
                        LOAD_CORE,
                        [
                            "redis-server",
                            "--port",
                            str(self.redis_port),
                            "--bind",
                            "127.0.0.1",
                            "--save",
                            "",
                            "--appendonly",
                            "no",
                        ],
                    ),
                    self.base_env(),
                    self.workdir / "redis.log",
                    self.redis_port,
                )
            )
            self._seed_credit()
        self.config_path = self.workdir / "bench_aliases.yaml"
        self.config_path.write_text(
            textwrap.dedent(CONFIG).format(
                upstream_port=self.upstream_port, key_hash=hash_key(SERVICE_KEY)
            )
        )
        self.full_config_path = self.workdir / "bench_aliases_full.yaml"
        self.full_config_path.write_text(self.config_path.read_text() + FULL_LIMITS)

    def _seed_credit(self) -> None:
        import redis

        from proxy.contract.redis_keys import RedisKeys, encode_snapshot

        client = redis.Redis(port=self.redis_port)
        client.set(RedisKeys(PREFIX).snapshot(USER_ID), encode_snapshot(10**12))
        client.close()

    @property
    def redis_url(self) -> str | None:
        return f"redis://127.0.0.1:{self.redis_port}/0" if self.redis_port else None

    def direct(self) -> Target:
        url = f"http://127.0.0.1:{self.upstream_port}/v1/chat/completions"
        return Target("direct", url, "bench-model", {}, None)

    def bare(self, wrap: Sequence[str] = ()) -> Target:
        """`wrap`: a command that runs the relay (e.g. valgrind; not pinned then)."""
        port = free_port()
        argv = python(
            "-m", "bench.bare_relay", "--port", str(port),
            "--upstream", f"http://127.0.0.1:{self.upstream_port}/v1",
        )  # fmt: skip
        if self.loop == "uvloop":
            argv.append("--uvloop")
        argv = [*wrap, *argv] if wrap else pinned(PROXY_CORE, argv)
        proc = self._start(
            Proc("bare", argv, self.base_env(), self.workdir / "bare.log", port),
            180.0 if wrap else 20.0,
        )
        return Target("bare", f"http://127.0.0.1:{port}/v1/chat/completions", "x", {}, proc)

    def proxy(
        self,
        name: str,
        *,
        full: bool,
        workers: int = 1,
        cores: str | None = PROXY_CORE,
        extra_env: dict[str, str] | None = None,
        source: Path | None = None,
        config: Path | None = None,
        wrap: Sequence[str] = (),
    ) -> Target:
        """`full`: Redis guard + paid alias (metering, pricing, outbox with a JSON-lines
        sink). Otherwise the relay only: no Redis, a free alias, no payer. `source`: a
        checkout of another revision to run instead of this one (bench_revisions).
        `wrap`: a command that runs the proxy (e.g. valgrind; not pinned then)."""
        port = free_port()
        env = self.base_env()
        env["LLM_PROXY_OUTBOX_PATH"] = str(self.workdir / f"outbox-{name}.sqlite3")
        env["LLM_PROXY_SINK_PATH"] = str(self.workdir / f"sink-{name}.jsonl")
        # The JSON-lines sink, not the embedded ledger: runs stay comparable across revisions.
        env["LLM_PROXY_EMBEDDED_LEDGER"] = "off"
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # serve --workers sets its own
        headers = {"Authorization": f"Bearer {SERVICE_KEY}"}
        if full:
            if self.redis_url is None:
                raise RuntimeError("the full pipeline needs redis-server on PATH")
            env["REDIS_URL"] = self.redis_url
            headers["X-User-Id"] = str(USER_ID)
        env.update(extra_env or {})
        config = config or (self.full_config_path if full else self.config_path)
        argv = python(
            "-m", "proxy", "--log-level", self.log_level, "serve",
            "--config", str(config), "--port", str(port), "--loop", self.loop,
        )  # fmt: skip
        if workers != 1:
            argv += ["--workers", str(workers)]
        if source is not None:
            env["PYTHONPATH"] = str(source)
        log = self.workdir / f"{name}.log"
        argv = [*wrap, *argv] if wrap else pinned(cores, argv)
        proc = self._start(
            Proc(name, argv, env, log, port, cwd=source or REPO), 180.0 if wrap else 20.0
        )
        model = "bench-paid" if full else "bench-free"
        return Target(name, f"http://127.0.0.1:{port}/v1/chat/completions", model, headers, proc)

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def run_on_stack(run: Callable[[Stack], object]) -> None:
    """Start the base stack in a temporary directory, run, print the JSON result."""
    with tempfile.TemporaryDirectory(prefix="llm-proxy-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.start_base()
            result = run(stack)
        finally:
            stack.close()
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


def timed_main(
    description: str, run: Callable[[Stack, float, int], object], quick_s: float, full_s: float
) -> None:
    """`main()` of a benchmark run(stack, seconds per round, rounds); --quick: one short."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run_on_stack(
        lambda stack: run(stack, quick_s if args.quick else full_s, 1 if args.quick else 3)
    )
