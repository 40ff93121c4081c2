"""Soak: a fixed mixed request rate for N minutes against real processes.

    python bench/soak.py --minutes 10 --rps 40
    python bench/soak.py --minutes 0.2            # a quick smoke run

Starts a fake upstream, a redis-server and the proxy (`python -m proxy serve`) as
subprocesses, drives an open-loop mix of requests (streamed, non-streamed, client
aborts, injected upstream resets and error statuses, a blocked user, bad requests),
samples the proxy's RSS, and at the end stops the proxy with SIGTERM (which drains
its outbox into the JSON-lines sink) and checks:

* RSS growth after warm-up <= --max-rss-growth (default 5 %);
* no request answered other than its kind's expected way (injected faults have
  expected answers of their own);
* the charge events in the sink are exactly the chargeable requests: one event per
  request that relayed tokens, none for the others, no duplicates.

Prints a JSON summary (and writes it to --out if given); exit status 0 on pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

REPO = Path(__file__).resolve().parent.parent
SERVICE_KEY = "sk-soak-service-key"
PROVIDER_KEY = "sk-soak-provider-key"
FAULT_FIELD = "x_soak_fault"
BLOCKED_USER = 999_999
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# kind: (share of requests, charged?) — the expected answer of each kind is in `_check`.
MIX: dict[str, tuple[float, bool]] = {
    "stream": (0.40, True),
    "json": (0.25, True),
    "stream_usage": (0.05, True),  # the caller asks for the usage chunk itself
    "abort": (0.10, True),  # client leaves after the first chunk: charged the estimate
    "reset": (0.05, True),  # upstream drops mid-stream: error event, charged the estimate
    "upstream_500": (0.04, False),
    "upstream_429": (0.03, False),
    "blocked": (0.04, False),  # the guard says 402
    "bad_request": (0.04, False),  # invalid JSON body: 400 before anything else
}

CONFIG = """
providers:
  fake:
    base_url: {base_url}
    api_key_env: SOAK_PROVIDER_KEY
    timeouts: {{connect: 2, first_byte: 30, idle: 30, total: 120}}
price_rules:
  std: {{input: 1000, cached_input: 500, output: 2000}}
aliases:
  # The fake upstream's per-request fault picker: a field only it reads, so allowed.
  smart: {{provider: fake, model: fake-model-v1, price_rule: std, tokenizer: o200k_base,
          allow_params: [x_soak_fault]}}
auth:
  mode: keys
  service_keys:
    - name: soak
      sha256: "{key_hash}"
      scenes: ["*"]
guard:
  prefix: "soak:"
  budget_ms: 200
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"soak: {what} exited early (status {proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"soak: {what} did not listen on {port} within {timeout}s")


# -- the fake upstream, run as `soak.py --role fake` --------------------------------------


def run_fake(port: int, chunks: int, delay: float) -> None:
    from aiohttp import web

    from proxy.devtools.fake_upstream import ENCODINGS, Behaviour, build_fake_app

    app = build_fake_app(Behaviour(chunks=chunks, chunk_delay=delay, fault_field=FAULT_FIELD))
    app[ENCODINGS].preload(["o200k_base"])

    async def forget_requests(app: web.Application) -> Any:
        # The fake keeps every request for tests; a soak would grow it without end.
        from proxy.devtools.fake_upstream import RECORDER

        async def trim() -> None:
            while True:
                await asyncio.sleep(5)
                app[RECORDER].requests.clear()

        task = asyncio.create_task(trim())
        yield
        task.cancel()

    app.cleanup_ctx.append(forget_requests)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- the load ------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    chargeable: set[str] = field(default_factory=set)  # request ids that must be charged
    finished: int = 0

    def bad(self, kind: str, what: str) -> None:
        self.unexpected[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {what}")


def pick_kind(rng: random.Random) -> str:
    x = rng.random()
    for kind, (share, _) in MIX.items():
        x -= share
        if x < 0:
            return kind
    return "stream"


def build_request(kind: str, n: int, rng: random.Random) -> tuple[bytes, dict[str, str]]:
    user = BLOCKED_USER if kind == "blocked" else rng.randint(1, 50)
    headers = {
        "Authorization": f"Bearer {SERVICE_KEY}",
        "Content-Type": "application/json",
        "X-User-Id": str(user),
        "X-Request-Id": f"soak-{n}",
    }
    if kind == "bad_request":
        return b'{"model": "smart", "messages": [', headers
    words = " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "soak")) for _ in range(12))
    body: dict[str, Any] = {
        "model": "smart",
        "messages": [{"role": "user", "content": f"request {n}: {words}"}],
        "stream": kind not in ("json", "upstream_500", "upstream_429", "blocked"),
    }
    if kind == "stream_usage":
        body["stream_options"] = {"include_usage": True}
    elif kind == "reset":
        body[FAULT_FIELD] = "reset"
    elif kind in ("upstream_500", "upstream_429"):
        body[FAULT_FIELD] = f"status:{kind[-3:]}"
    return orjson.dumps(body), headers


async def one_request(
    session: aiohttp.ClientSession, url: str, kind: str, n: int, rng: random.Random, t: Tally
) -> None:
    data, headers = build_request(kind, n, rng)
    rid = headers["X-Request-Id"]
    t.sent[kind] += 1
    try:
        async with session.post(url, data=data, headers=headers) as resp:
            if kind == "abort":
                if resp.status != 200:
                    t.bad(kind, f"status {resp.status}")
                    return
                first = await resp.content.readany()
                if not first:
                    t.bad(kind, "empty stream")
                    return
                t.chargeable.add(rid)  # the proxy relayed tokens: it must charge them
                resp.close()  # leave mid-stream
                t.ok[kind] += 1
                return
            raw = await resp.read()
            problem = _check(kind, resp.status, raw)
    except (aiohttp.ClientError, TimeoutError) as exc:
        t.bad(kind, f"{type(exc).__name__}: {exc}")
        return
    finally:
        t.finished += 1
    if problem:
        t.bad(kind, problem)
        return
    t.ok[kind] += 1
    if MIX[kind][1]:
        t.chargeable.add(rid)


def _check(kind: str, status: int, raw: bytes) -> str | None:
    """None when the answer is what this kind of request must get."""
    want = {"upstream_500": 500, "upstream_429": 429, "blocked": 402, "bad_request": 400}
    if kind in want:
        if status != want[kind]:
            return f"status {status}, want {want[kind]}"
        err = orjson.loads(raw).get("error")
        return None if isinstance(err, dict) and "message" in err else "not an OpenAI error"
    if status != 200:
        return f"status {status}: {raw[:200]!r}"
    if kind == "json":
        return None if orjson.loads(raw).get("usage") else "no usage in the reply"
    if kind == "reset":
        return None if b"event: error\n" in raw else "no error event after the reset"
    if not raw.endswith(b"data: [DONE]\n\n"):
        return f"stream did not end with [DONE]: {raw[-120:]!r}"
    if (kind == "stream_usage") != (b'"usage":{' in raw):
        return "usage chunk present/absent contrary to the request"
    return None


async def drive(
    url: str, seconds: float, rps: float, seed: int, proxy_pid: int, sample_every: float
) -> tuple[Tally, list[tuple[float, int]]]:
    rng = random.Random(seed)
    tally = Tally()
    samples: list[tuple[float, int]] = []
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks: set[asyncio.Task[None]] = set()
        next_sample = start
        n = 0
        while True:
            now = loop.time()
            if now >= next_sample:
                samples.append((round(now - start, 1), rss_kb(proxy_pid)))
                next_sample += sample_every
            if now - start >= seconds:
                break
            # Open loop: request n starts at start + n/rps, however slow the others are.
            due = start + n / rps
            if due > now:
                await asyncio.sleep(min(due - now, max(0.0, next_sample - now)))
                continue
            task = asyncio.create_task(
                one_request(
                    session, url, pick_kind(rng), n, random.Random(seed * 1_000_003 + n), tally
                )
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.wait(tasks, timeout=150)
        samples.append((round(loop.time() - start, 1), rss_kb(proxy_pid)))
    return tally, samples


# -- orchestration -------------------------------------------------------------------------


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def seed_redis(port: int) -> None:
    import redis

    from proxy.contract.redis_keys import RedisKeys, encode_snapshot

    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        for user in range(1, 51):
            client.set(RedisKeys("soak:").snapshot(user), encode_snapshot(10**9), ex=86_400)
        client.set(RedisKeys("soak:").blocked(BLOCKED_USER), b"soak", ex=86_400)
    finally:
        client.close()


def rss_verdict(samples: list[tuple[float, int]], warmup_s: float) -> tuple[int, int, float]:
    """(RSS after warm-up, RSS at the end, growth %): medians of 3 samples each, so a
    momentary peak (a burst of in-flight requests) is not mistaken for growth."""
    after = [kb for t, kb in samples if t >= warmup_s]
    if len(after) < 2:
        after = [kb for _, kb in samples[-2:]]
    head = sorted(after[:3])[len(after[:3]) // 2]
    tail = sorted(after[-3:])[len(after[-3:]) // 2]
    return head, tail, round(100.0 * (tail - head) / head, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rps", type=float, default=40.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup-fraction", type=float, default=0.2)
    p.add_argument("--max-rss-growth", type=float, default=5.0, help="percent")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--chunk-delay", type=float, default=0.01)
    p.add_argument("--workdir", help="keep logs, outbox and sink here (default: a temp dir)")
    p.add_argument("--out", help="also write the JSON summary to this file")
    p.add_argument("--role", choices=("soak", "fake"), default="soak", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # `python bench/soak.py` from a checkout
    if args.role == "fake":
        run_fake(args.port, args.chunks, args.chunk_delay)
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    fake_port, redis_port, proxy_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_bin = shutil.which("redis-server") or "redis-server"
        procs.append(
            start(
                [
                    redis_bin,
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(work),
                ],
                work / "redis.log",
            )
        )
        wait_port(redis_port, procs[-1], "redis-server")
        seed_redis(redis_port)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs.append(
            start(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    "fake",
                    "--port",
                    str(fake_port),
                    "--chunks",
                    str(args.chunks),
                    "--chunk-delay",
                    str(args.chunk_delay),
                ],
                work / "fake.log",
                env,
            )
        )
        wait_port(fake_port, procs[-1], "fake upstream")
        config = work / "soak.yaml"
        config.write_text(
            CONFIG.format(
                base_url=f"http://127.0.0.1:{fake_port}/v1",
                key_hash=hashlib.sha256(SERVICE_KEY.encode()).hexdigest(),
            )
        )
        sink = work / "charge-events.jsonl"
        proxy_env = {
            **env,
            "SOAK_PROVIDER_KEY": PROVIDER_KEY,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "LLM_PROXY_OUTBOX_PATH": str(work / "outbox.sqlite3"),
            "LLM_PROXY_SINK_PATH": str(sink),
            "LLM_PROXY_EMBEDDED_LEDGER": "off",  # the soak counts events in the file
            "LOG_LEVEL": "warning",
        }
        proxy_env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
        proxy = start(
            [
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--config",
                str(config),
                "--port",
                str(proxy_port),
            ],
            work / "proxy.log",
            proxy_env,
        )
        procs.append(proxy)
        wait_port(proxy_port, proxy, "proxy")

        seconds = args.minutes * 60
        warmup = seconds * args.warmup_fraction
        sample_every = max(1.0, min(10.0, seconds / 30))
        url = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        started = time.monotonic()
        tally, samples = asyncio.run(
            drive(url, seconds, args.rps, args.seed, proxy.pid, sample_every)
        )
        elapsed = time.monotonic() - started
        # SIGTERM: in-flight requests finish, the outbox drains into the sink.
        proxy_status = stop(proxy, timeout=60)
        events = (
            [orjson.loads(line) for line in sink.read_bytes().splitlines()] if sink.exists() else []
        )
    finally:
        for proc in reversed(procs):
            stop(proc)

    by_request = Counter(e["request_id"] for e in events)
    event_ids = Counter(e["event_id"] for e in events)
    charged = set(by_request)
    head_kb, tail_kb, growth = rss_verdict(samples, warmup)
    log_text = (work / "proxy.log").read_text(errors="replace")
    summary = {
        "minutes": args.minutes,
        "rps_target": args.rps,
        "rps_achieved": round(sum(tally.sent.values()) / max(elapsed, 1e-9), 2),
        "requests": sum(tally.sent.values()),
        "finished": tally.finished,
        "by_kind": {k: {"sent": tally.sent[k], "ok": tally.ok[k]} for k in MIX},
        "unexpected": dict(tally.unexpected),
        "unexpected_examples": tally.examples,
        "chargeable_requests": len(tally.chargeable),
        "charge_events": len(events),
        "duplicate_event_ids": sum(c - 1 for c in event_ids.values() if c > 1),
        "requests_charged_twice": sum(1 for c in by_request.values() if c > 1),
        "chargeable_not_charged": len(tally.chargeable - charged),
        "charged_not_chargeable": len(charged - tally.chargeable),
        "rss_kb_after_warmup": head_kb,
        "rss_kb_end": tail_kb,
        "rss_growth_pct": growth,
        "rss_samples": samples,
        "proxy_exit_status": proxy_status,
        "proxy_log_errors": log_text.count(" ERROR ") + log_text.count("Traceback"),
        "workdir": str(work),
    }
    checks = {
        "rss_growth_ok": growth <= args.max_rss_growth,
        "no_unexpected_answers": not tally.unexpected,
        "events_equal_chargeable": charged == tally.chargeable
        and len(events) == len(tally.chargeable),
        "clean_shutdown": proxy_status == 0,
        "no_errors_logged": summary["proxy_log_errors"] == 0,
    }
    summary["checks"] = checks
    summary["passed"] = all(checks.values())
    text = orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if summary["passed"] and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
