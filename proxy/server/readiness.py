"""Readiness: what `/readyz` reports, and the policy of what makes the proxy unready."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.server.state import ProxyState


async def readiness(state: ProxyState) -> dict[str, Any]:
    """Each dependency's state. Only what prevents serving makes us unready: no
    alias with a usable provider key, no way to authenticate any caller, or a
    closed outbox (no charge could be recorded). The guard fails open and the
    outbox buffers while Kafka is away, so Redis and Kafka trouble report
    `degraded` but stay ready. Outbox enqueue
    failures report `failing` but stay ready too: an unready proxy gets no
    traffic and could never see the outbox recover; alert on
    llm_proxy_charge_events_total{result="enqueue_failed"} instead."""
    providers = state.config.providers
    missing = sorted(n for n, p in providers.items() if p.key_missing)
    servable = sum(
        any(p.name not in missing for p in (a.provider, *(t.provider for t in a.targets)))
        for a in state.config.aliases.values()
    )
    checks: dict[str, Any] = {
        "config": {
            "status": "ok" if servable else "error",
            "aliases": len(state.config.aliases),
            "servable_aliases": servable,
            "providers": len(providers),
            "providers_without_key": missing,
        }
    }
    if not servable:
        checks["config"]["reason"] = "no alias has a provider with its API key set"
    callers = state.auth.callers()
    checks["auth"] = (
        {"status": "ok", "callers": callers}
        if callers
        else {
            "status": "error",
            "reason": "no caller can authenticate: configure auth.service_keys, "
            "or set REDIS_URL for user keys",
        }
    )
    targets = state.router.report()
    cooling = sorted(k for k, t in targets.items() if t["state"] != "ok")
    # A target in cooldown is skipped while others answer: degraded, never unready.
    checks["routing"] = {
        "status": "degraded" if cooling else "ok",
        "cooling": cooling,
        "targets": targets,
    }
    if state.redis is None:
        checks["redis"] = {"status": "disabled"}
    else:
        try:
            async with asyncio.timeout(0.25):
                await state.redis.ping()
            checks["redis"] = {"status": "ok"}
        except Exception as exc:
            checks["redis"] = {"status": "degraded", "error": type(exc).__name__}
    if not state.outbox.is_open:
        outbox_status = "closed"
    elif state.observer.last_record_failed:
        outbox_status = "failing"
    else:
        outbox_status = "ok"
    checks["outbox"] = {
        "status": outbox_status,
        "pending": state.outbox.pending_count(),
        "uncommitted": state.outbox.queued_count(),
        "oldest_pending_age_s": state.outbox.oldest_pending_age(),
        "record_failures": state.observer.record_failures,
    }
    failures = state.publisher.consecutive_failures
    # "relay": the key operators and dashboards already know (the outbox publisher).
    checks["relay"] = {
        "status": "degraded" if failures else "ok",
        "sink": state.sink_description,
        "consecutive_publish_failures": failures,
    }
    ready = servable > 0 and callers is not None and state.outbox.is_open
    if not ready:
        status = "unready"
    elif any(c["status"] in ("degraded", "failing") for c in checks.values()):
        status = "degraded"
    else:
        status = "ok"
    return {"ready": ready, "status": status, "checks": checks}
