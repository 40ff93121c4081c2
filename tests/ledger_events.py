"""Charge events for the ledger tests."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence

from proxy.contract.charge_event import ChargeEvent, new_event_id
from proxy.contract.outcome import Outcome
from proxy.contract.timestamps import format_timestamp
from proxy.contract.usage import Usage, UsageSource


def charge_event(
    user_id: int,
    credits: int,
    *,
    alias: str = "gpt-4o",
    scene: str = "chat",
    prompt: int = 3,
    completion: int = 4,
    unix_ms: int | None = None,
    endpoint: str = "chat.completions",
) -> ChargeEvent:
    ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
    return ChargeEvent(
        event_id=new_event_id(ms),
        occurred_at=format_timestamp(ms),
        started_at=format_timestamp(ms),
        request_id=uuid.uuid4().hex,
        user_id=user_id,
        scene=scene,
        conversation_id="c1",
        alias=alias,
        provider="openai",
        upstream_model="gpt-4o",
        stream=True,
        usage=Usage(
            prompt_tokens=prompt, completion_tokens=completion, cached_tokens=1, reasoning_tokens=2
        ),
        usage_source=UsageSource.UPSTREAM,
        price_rule="gpt4o",
        credits=credits,
        outcome=Outcome.COMPLETED,
        latency_ms=1.0,
        ttft_ms=0.5,
        endpoint=endpoint,
    )


def random_charges(n: int, users: Sequence[int], seed: int) -> list[ChargeEvent]:
    rnd = random.Random(seed)
    return [charge_event(rnd.choice(users), rnd.randint(0, 50)) for _ in range(n)]
