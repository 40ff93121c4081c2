"""Interpreter instructions per call of the request path's own functions.

Run: python -m bench.bench_instructions [CASE ...] [--calls N]
Each case runs under `valgrind --tool=cachegrind --cache-sim=no` twice, with N calls
and with none; the difference divided by N is printed (deterministic: other load on
the machine does not move it; PYTHONHASHSEED is fixed). `--run CASE N` runs one case
in this process (what valgrind is given). Asserts nothing.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from typing import Any

import orjson
import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.billing.metering import Metered, meter_json
from proxy.billing.payer import BillingContext
from proxy.billing.record import ChatRequest, Exchange
from proxy.billing.settlement import settle
from proxy.billing.usage_report import normalise
from proxy.config import parse_config
from proxy.contract.outcome import Outcome
from proxy.contract.redis_keys import key_sha256
from proxy.contract.usage import Usage, UsageSource
from proxy.telemetry.access_log import access_line
from proxy.telemetry.observer import Observer

CONFIG_YAML = """
providers:
  fake: {base_url: "http://127.0.0.1:9/v1", api_key_env: K}
price_rules:
  std: {input: 1000, cached_input: 500, output: 2000}
aliases:
  smart: {provider: fake, model: m1, price_rule: std}
auth:
  service_keys:
    - {name: backend, sha256: "%s", scenes: ["*"]}
"""
KEY = "sk-service-key-0123456789abcdef"
config = parse_config(yaml.safe_load(CONFIG_YAML % key_sha256(KEY)), "t.yaml", {"K": "sk-test"})
alias = config.aliases["smart"]
BODY = {"model": "smart", "messages": [{"role": "user", "content": "hello there"}]}
REPLY = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi! How can I help?"},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 7,
            "total_tokens": 19,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
    }
)


def exchange():
    ex = Exchange(100.0)
    ex.chat = ChatRequest(alias, BODY, False, False)
    ex.ctx = BillingContext.normalize(
        user_id=7, scene="chat", request_id="req-1", principal="backend"
    )
    ex.guard_decision = "allow"
    ex.upstream_started = 100.002
    ex.first_byte_at = 100.052
    ex.metered = Metered(Usage(12, 7), UsageSource.UPSTREAM)
    ex.finish(Outcome.COMPLETED, 200)
    return ex


def run(case: str, n: int) -> None:
    enc: Any = None
    if case == "meter_json":
        enc = None
        for _ in range(n):
            meter_json(REPLY, BODY, enc, 100, None)
    elif case == "normalise":
        raw = orjson.loads(REPLY)["usage"]
        for _ in range(n):
            normalise(raw)
    elif case == "loads":
        for _ in range(n):
            orjson.loads(REPLY)
    elif case == "message_reply":
        from proxy.billing.metering import message_reply

        o = orjson.loads(REPLY)
        for _ in range(n):
            message_reply(o)
    elif case == "find_report":
        from proxy.billing.usage_report import find_report

        o = orjson.loads(REPLY)
        for _ in range(n):
            find_report(o)
    elif case == "price":
        from proxy.billing.pricing import price

        u = Usage(12, 7)
        for _ in range(n):
            price(alias.price_rule, u, service_tier=None, started_ms=1700000000000)
    elif case == "event_create":
        from proxy.contract.charge_event import ChargeEvent

        ex = exchange()
        s = settle(ex, 100.1)
        e = s.event
        kw = dict(
            request_id="r",
            user_id=7,
            scene="chat",
            conversation_id=None,
            alias="smart",
            provider="fake",
            upstream_model="m1",
            stream=False,
            usage=e.usage,
            usage_source=e.usage_source,
            price_rule="std",
            price_version=None,
            service_tier=None,
            started_ms=ex.started_ms,
            credits=5,
            outcome=Outcome.COMPLETED,
            latency_ms=1.0,
            ttft_ms=2.0,
            client_disconnected=False,
            endpoint="chat.completions",
            attempts=1,
        )
        for _ in range(n):
            kw["started_ms"] = time.time_ns() // 1_000_000 - 1500
            ChargeEvent.create(**kw)
    elif case == "al_dumps":
        from proxy.telemetry import access_log as al

        ex = exchange()
        s = settle(ex, 100.1)
        line = orjson.loads(al.access_line(ex, s, 100.1))
        pass
        for _ in range(n):
            orjson.dumps(line).decode()
    elif case == "al_dumps_enum":
        from proxy.telemetry import access_log as al

        ex = exchange()
        s = settle(ex, 100.1)
        line = orjson.loads(al.access_line(ex, s, 100.1))
        line["outcome"] = ex.outcome
        line["usage_source"] = ex.metered.source
        for _ in range(n):
            orjson.dumps(line).decode()
    elif case == "al_now":
        from proxy.telemetry import access_log as al

        for _ in range(n):
            al._now_text()
    elif case == "round":
        x = 100.1
        for _ in range(n):
            round((x - 100.0) * 1000, 3)
    elif case == "settle_same":
        ex = exchange()
        for _ in range(n):
            ex.started_ms = time.time_ns() // 1_000_000
            settle(ex, 100.1)
    elif case == "settle":
        ex = exchange()
        for _ in range(n):
            ex.started_ms = time.time_ns() // 1_000_000 - 1500
            settle(ex, 100.1)
    elif case == "access_line":
        ex = exchange()
        s = settle(ex, 100.1)
        for _ in range(n):
            access_line(ex, s, 100.1)
    elif case == "observe":
        from proxy.telemetry.metrics import ProxyMetrics

        m = ProxyMetrics()
        ex = exchange()
        s = settle(ex, 100.1)
        for _ in range(n):
            m.observe_request(ex, s, 100.1, 100.11)
    elif case == "request_finished":
        import logging

        logging.getLogger("proxy.access").setLevel(logging.WARNING)
        o = Observer()
        ex = exchange()
        s = settle(ex, 100.1)
        for _ in range(n):
            o.in_flight += 1
            o.request_finished(ex, s, 100.1, 100.11)
    elif case == "to_json":
        ex = exchange()
        s = settle(ex, 100.1)
        for _ in range(n):
            s.event.to_json()
    elif case == "auth":
        from proxy.billing.auth import Authenticator

        a = Authenticator(config.auth, None, "p:")
        h = CIMultiDictProxy(
            CIMultiDict(
                {
                    "Authorization": "Bearer " + KEY,
                    "X-User-Id": "42",
                    "X-Billing-Scene": "chat",
                    "Content-Type": "application/json",
                    "Host": "x",
                    "Content-Length": "80",
                }
            )
        )

        async def go():
            for _ in range(n):
                await a.authenticate(h, None)

        asyncio.run(go())
    elif case == "parse_chat_request":
        from proxy.server.chat_request import parse_chat_request

        for _ in range(n):
            parse_chat_request(BODY, config.aliases, started_ms=1)
    elif case == "decode_body":
        from proxy.server.chat_request import decode_body

        raw = orjson.dumps(BODY)
        for _ in range(n):
            decode_body(raw)
    elif case == "watchdog":
        from proxy.upstream.watchdog import Watchdog

        t = alias.provider.timeouts

        async def go():
            for _ in range(n):
                wd = Watchdog(t)
                wd.first_byte()
                wd.touch()
                wd.cancel()

        asyncio.run(go())
    else:
        raise SystemExit(f"unknown case {case}")


CASES = [
    "meter_json",
    "normalise",
    "find_report",
    "message_reply",
    "loads",
    "settle",
    "settle_same",
    "price",
    "event_create",
    "to_json",
    "access_line",
    "al_now",
    "observe",
    "request_finished",
    "auth",
    "parse_chat_request",
    "decode_body",
    "watchdog",
]


def _instructions(case: str, n: int) -> int:
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    cmd += [sys.executable, "-m", "bench.bench_instructions", "--run", case, str(n)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stderr
    found = re.search(r"I\s+refs:\s+([\d,]+)", out)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind for {case}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str]) -> None:
    if argv[:1] == ["--run"]:
        run(argv[1], int(argv[2]))
        return
    calls = 1000
    if "--calls" in argv:
        i = argv.index("--calls")
        calls = int(argv[i + 1])
        del argv[i : i + 2]
    for case in argv or CASES:
        per_call = (_instructions(case, calls) - _instructions(case, 0)) / calls
        print(f"{case:20} {per_call / 1000:8.2f}k instructions per call")


if __name__ == "__main__":
    main(sys.argv[1:])
