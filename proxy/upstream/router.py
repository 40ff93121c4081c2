"""Routing one request over its alias's targets (then its fallbacks' targets):
retries and backoff before the first byte, cooldowns, per-target concurrency.

Nothing is retried once the caller may have a byte: `send` returns the first
response head that is not retried, and the relay owns it from there. A retry
happens only on what `routing.retry_on` names: no head (`connect`), no head in
the first-byte bound (`timeout`), or a 429/5xx head (its body is dropped, never
relayed). Failed attempts consumed nothing the caller saw and are never charged.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from proxy.billing.record import ErrorKind, Exchange
from proxy.config.model import Alias, RoutingPolicy, Target
from proxy.contract.outcome import Outcome
from proxy.errors import ApiError, credentials_missing, upstream_busy, upstream_failed_status
from proxy.upstream.cooldown import Breaker, Slots, monotonic
from proxy.upstream.failures import Phase, classify
from proxy.upstream.http_client import UpstreamResponse
from proxy.upstream.pools import UpstreamPools, upstream_body
from proxy.upstream.targets import weighted_order
from proxy.upstream.watchdog import Watchdog, WatchdogTicker

# Results of one attempt (the `result` label of llm_proxy_upstream_attempts_total).
ATTEMPT_RESULTS = ("ok", "connect", "timeout", "429", "5xx", "busy")

AttemptHook = Callable[[str, str], None]  # (provider, result)
CooldownHook = Callable[[Target, bool], None]  # (target, cooling)


def _noop(*_: object) -> None:
    return None


def retry_after_s(headers: Mapping[str, str]) -> float:
    """The upstream's `retry-after-ms` or `Retry-After` (seconds) hint; 0 when none.
    (An HTTP-date Retry-After is not read: providers send seconds.)"""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw:
            try:
                value = float(raw) * scale
            except ValueError:
                continue
            if value == value and 0 < value < 3600:  # not NaN, not absurd
                return value
    return 0.0


def backoff_s(policy: RoutingPolicy, tries: int, rng: random.Random, hint: float) -> float:
    """Before the `tries`+1-th attempt on one target: exponential, half jittered,
    at least the upstream's Retry-After hint."""
    if policy.backoff_base_ms <= 0:
        base = 0.0
    else:
        cap = policy.backoff_max_ms / 1000
        base = min(cap, policy.backoff_base_ms / 1000 * 2 ** max(0, tries - 1))
        base = base / 2 + rng.random() * base / 2
    return max(base, hint)


@dataclass(slots=True)
class _Attempt:
    result: str  # one of ATTEMPT_RESULTS
    up: UpstreamResponse | None = None  # the response to relay
    wd: Watchdog | None = None
    strip: bool = False
    error: ApiError | None = None  # what the caller gets should no later attempt answer
    hint: float = 0.0  # the upstream's Retry-After, seconds


class Router:
    """Per process: the breakers and slots of every target, and the choice of one."""

    def __init__(
        self,
        pools: UpstreamPools,
        aliases: Mapping[str, Alias],
        *,
        rng: random.Random | None = None,
        on_attempt: AttemptHook = _noop,
        on_cooldown: CooldownHook = _noop,
    ) -> None:
        self._pools = pools
        self._aliases = aliases
        self._rng = rng or random.Random()
        self._on_attempt = on_attempt
        self._ticker = WatchdogTicker()  # one timer checks every request's bounds
        self._breakers: dict[str, Breaker] = {}
        self._slots: dict[str, Slots] = {}
        self._views: dict[tuple[str, str, str], Alias] = {}
        self._targets: dict[str, Target] = {}
        # An alias with one target and no fallbacks has one candidate list, always.
        self._single: dict[str, list[tuple[Alias, Target]]] = {
            name: [(a, a.targets[0])]
            for name, a in aliases.items()
            if len(a.targets) == 1 and not a.fallbacks
        }
        for alias in aliases.values():
            for t in alias.targets:
                self._targets.setdefault(t.key, t)
                if t.key not in self._breakers:
                    self._breakers[t.key] = Breaker(
                        lambda cooling, t=t: on_cooldown(t, cooling)  # type: ignore[misc]
                    )
                    on_cooldown(t, False)  # every target's series exists from the start
                if t.max_concurrency is not None and t.key not in self._slots:
                    self._slots[t.key] = Slots(t.max_concurrency)

    # -- choosing ---------------------------------------------------------------------

    def _view(self, alias: Alias, owner: Alias, target: Target) -> Alias:
        """The requested alias as served by `target` (of `owner`: itself or a fallback):
        what the relay, the charge and the logs read as `chat.alias`."""
        key = (alias.name, owner.name, target.key)
        view = self._views.get(key)
        if view is None:
            if owner is alias and target is alias.targets[0]:
                view = alias
            else:
                view = replace(
                    alias,
                    provider=target.provider,
                    model=target.model,
                    price_rule=target.price_rule,
                )
            self._views[key] = view
        return view

    def candidates(self, alias: Alias) -> list[tuple[Alias, Target]]:
        """Every target in the order to try: the alias's, then each fallback's; the ones
        cooling down moved last (tried only when nothing else answered)."""
        single = self._single.get(alias.name)
        if single is not None and single[0][0] is alias:
            return single  # (callers only read it)
        rng = self._rng
        out = [(self._view(alias, alias, t), t) for t in weighted_order(alias.targets, rng)]
        for name in alias.fallbacks:
            owner = self._aliases[name]
            out += [(self._view(alias, owner, t), t) for t in weighted_order(owner.targets, rng)]
        if len(out) > 1:
            now = monotonic()
            policy = alias.routing
            ready: list[tuple[Alias, Target]] = []
            cooling: list[tuple[Alias, Target]] = []
            for c in out:
                (ready if self._breakers[c[1].key].available(now, policy) else cooling).append(c)
            if cooling:
                out = ready + cooling
        return out

    # -- sending ------------------------------------------------------------------------

    async def send(
        self, ex: Exchange, path: str = "/chat/completions"
    ) -> tuple[UpstreamResponse, Watchdog, bool]:
        """Send the request to its targets in turn until one answers a head that is
        not retried; returns it, its Watchdog and whether the usage chunk is to be
        stripped. `ex.chat.alias` becomes the serving target's view, `ex.attempts`
        the attempts made; `path` is the endpoint's, under each provider's base URL.
        Raises the caller's error when no target answered."""
        assert ex.chat is not None
        chat = ex.chat
        alias = chat.alias
        policy = alias.routing
        cands = self.candidates(alias)
        max_attempts = len(cands) if policy.retries is None else policy.retries + 1
        sequence = (
            cands
            if max_attempts <= len(cands)
            else [cands[i % len(cands)] for i in range(max_attempts)]
        )
        deadline = None if policy.deadline_s is None else ex.started + policy.deadline_s
        tries: dict[str, int] = {}
        hints: dict[str, float] = {}
        last: ApiError | None = None
        busy = False
        attempts = 0
        ex.upstream_started = time.perf_counter()
        for n, (view, target) in enumerate(sequence):
            if attempts >= max_attempts:
                break
            provider = target.provider
            if view is not alias and not view.serves(chat.endpoint):
                continue  # a fallback or target that does not speak this API
            ex.chat = chat if view is alias else replace(chat, alias=view)
            if provider.key_missing:
                last = last or credentials_missing(provider.name, provider.api_key_env or "")
                continue
            done = tries.get(target.key, 0)
            if done:
                delay = backoff_s(policy, done, self._rng, hints.get(target.key, 0.0))
                if deadline is not None and time.perf_counter() + delay > deadline:
                    break
                if delay > 0:
                    await asyncio.sleep(delay)
            elif attempts and deadline is not None and time.perf_counter() > deadline:
                break
            release = await self._slot(target, policy)
            if release is None:
                busy = True
                self._on_attempt(provider.name, "busy")
                continue
            attempts += 1
            ex.attempts = attempts
            tries[target.key] = done + 1
            more = attempts < max_attempts and n + 1 < len(sequence)
            got = await self._attempt(ex, target, policy, release, more, path)
            self._on_attempt(provider.name, got.result)
            if got.up is not None:
                assert got.wd is not None
                return got.up, got.wd, got.strip
            last = got.error
            hints[target.key] = got.hint
        if last is None:
            last = upstream_busy() if busy else upstream_failed_status("?", 502)
        if ex.outcome is None:
            ex.finish(Outcome.UPSTREAM_ERROR, last.status)
        raise last

    async def _slot(self, target: Target, policy: RoutingPolicy) -> Callable[[], None] | None:
        slots = self._slots.get(target.key)
        if slots is None:
            return _noop
        return await slots.acquire(policy.max_wait_ms / 1000)

    async def _attempt(
        self,
        ex: Exchange,
        target: Target,
        policy: RoutingPolicy,
        release: Callable[[], None],
        more: bool,
        path: str,
    ) -> _Attempt:
        """One attempt: the response to relay, or why to try the next. Raises the
        caller's error when it is not retried, and the client leaving."""
        assert ex.chat is not None
        provider = target.provider
        breaker = self._breakers[target.key]
        breaker.begin(monotonic())
        payload, strip = upstream_body(ex.chat)
        wd = Watchdog(provider.timeouts, self._ticker)
        try:
            up = await self._pools.post(provider, payload, ex.request_id, path)
        except BaseException as exc:
            wd.cancel()
            release()
            failure = classify(exc, wd, provider.name, Phase.HEAD)
            if failure is None:
                raise
            if failure.error is None:  # the client left
                ex.finish(failure.outcome, failure.status, failure.kind)
                raise
            result = "timeout" if failure.kind is ErrorKind.TIMEOUT else "connect"
            breaker.failure(monotonic(), policy)
            if more and result in policy.retry_on:
                return _Attempt(result, error=failure.error)
            ex.finish(failure.outcome, failure.status, failure.kind)
            raise failure.error from None
        status = up.status
        if status == 429 or status >= 500:
            result = "429" if status == 429 else "5xx"
            breaker.failure(monotonic(), policy)
            if more and result in policy.retry_on:
                hint = retry_after_s(up.headers)
                wd.cancel()
                up.close()  # its body is never read: the connection is not reused
                release()
                return _Attempt(
                    result, error=upstream_failed_status(provider.name, status), hint=hint
                )
        else:
            breaker.success()
            result = "ok"
        if release is not _noop:
            ex.cleanups.append(release)
        return _Attempt(result, up, wd, strip)

    # -- reporting --------------------------------------------------------------------

    def report(self) -> dict[str, dict[str, object]]:
        """Each target's breaker and slots (for /readyz)."""
        now = monotonic()
        out: dict[str, dict[str, object]] = {}
        for key, t in self._targets.items():
            b = self._breakers[key]
            entry: dict[str, object] = {"state": b.state(now)}
            if b.open_until and now < b.open_until:
                entry["cooldown_remaining_s"] = round(b.open_until - now, 3)
            slots = self._slots.get(key)
            if slots is not None:
                entry["in_flight"] = slots.in_use
                entry["max_concurrency"] = t.max_concurrency
            out[key] = entry
        return out

    def cooling(self) -> list[str]:
        return [k for k, b in self._breakers.items() if b.cooling]
