"""The configuration as frozen values: what `model_aliases.yaml` says, validated.

Only values live here; `proxy.config.load` builds them from YAML, and the
environment (where infrastructure is, secrets) is `proxy.config.env`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum

from proxy.config.request_params import AUDIO, SERVICE_TIER, WEB_SEARCH
from proxy.config.store import StoreConfig
from proxy.contract.redis_keys import DEFAULT_PREFIX

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# The offline encodings (proxy.billing.encodings ships their rank files).
DEFAULT_ENCODING = "o200k_base"
SUPPORTED_ENCODINGS = ("cl100k_base", "o200k_base")
# `Charge.rule_id` of aliases marked `free: true`; reserved, no price rule may use it.
FREE_RULE_ID = "free"
# Admission defaults (README "Credit guard"): the output allowance of a request that
# names no limit; the fewest output tokens a clamped request may be left with; how
# long a hold counts (above the default providers.*.timeouts.total of 600 s).
DEFAULT_RESERVE_OUTPUT_TOKENS = 4096
DEFAULT_CLAMP_MIN_TOKENS = 16
DEFAULT_HOLD_TTL_S = 900.0
ANY_SCENE = "*"
SCENE_RE = re.compile(r"[a-z0-9][a-z0-9._:/-]{0,63}")
# An alias's `endpoints` (config names) → the API each names, as the charge event
# spells it (proxy.contract.charge_event.ENDPOINTS).
ENDPOINT_NAMES = {
    "chat": "chat.completions",
    "responses": "responses",
    "embeddings": "embeddings",
    "completions": "completions",
}
DEFAULT_ENDPOINTS = frozenset({"chat.completions"})


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. `first_byte` bounds the wait for the response head and first body
    chunk, `idle` the gap between two chunks, `total` the whole exchange."""

    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 60.0
    total: float = 600.0


class OnDisconnect(StrEnum):
    """What a stream does when its caller leaves (README "Client disconnects")."""

    ABORT = "abort"  # close the upstream exchange at once; charge the estimate
    DRAIN = "drain"  # keep reading (writing nothing) until the usage report or a limit


@dataclass(frozen=True, slots=True)
class DisconnectPolicy:
    action: OnDisconnect = OnDisconnect.ABORT
    drain_timeout_s: float = 30.0  # longest drain after the caller left
    drain_max_bytes: int = 4 * 1024 * 1024  # most bytes read (and dropped) while draining


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_url: str  # without trailing slash, e.g. https://api.openai.com/v1
    api_key_env: str | None
    # The secret itself, resolved from `api_key_env` at load time; kept out of repr.
    api_key: str | None = field(repr=False)
    stream_usage: bool = True  # upstream honours stream_options.include_usage
    timeouts: Timeouts = Timeouts()
    max_connections: int = 256  # keep-alive pool bound for this provider
    disconnect: DisconnectPolicy = DisconnectPolicy()
    # The provider speaks the Responses API (and stores responses, so GET/DELETE by
    # id work); `responses: false` for one that only speaks chat completions.
    responses: bool = True

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def url(self, path: str) -> str:
        """`path` (e.g. "/embeddings") under the provider's base URL."""
        return f"{self.base_url}{path}"

    @property
    def key_missing(self) -> bool:
        """A key is configured by name but the variable is not set."""
        return bool(self.api_key_env) and not self.api_key


@dataclass(frozen=True, slots=True)
class Rates:
    """Credits per 1M tokens of each kind (proxy.billing.pricing has the formula)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal  # prompt tokens served from the provider's cache
    reasoning: Decimal  # hidden reasoning, part of the completion
    cache_write: Decimal  # prompt tokens written to the provider's cache
    # Audio tokens (prompt_tokens_details / completion_tokens_details.audio_tokens).
    # None: not priced separately (the text rate); an alias that allows `audio`
    # needs both (proxy.config.load), so audio is never billed as cheap text.
    audio_input: Decimal | None = None
    audio_output: Decimal | None = None

    @classmethod
    def simple(cls, input: Decimal, output: Decimal) -> Rates:
        """Only `input` and `output` given: every other rate follows its default."""
        return cls(input, output, input, output, input)


@dataclass(frozen=True, slots=True)
class PromptTier:
    """Long-context pricing: when a request's prompt has more than
    `above_prompt_tokens` tokens, all of it is priced at these rates."""

    above_prompt_tokens: int
    rates: Rates


@dataclass(frozen=True, slots=True)
class ServiceTier:
    """The price of a request's `service_tier` value: its own rates (None: the rates
    the request would otherwise get) times `multiplier`."""

    name: str
    rates: Rates | None
    multiplier: Decimal = Decimal(1)


@dataclass(frozen=True, slots=True)
class PriceSchedule:
    """One version of a price rule: every term of the formula."""

    rates: Rates
    multiplier: Decimal = Decimal(1)
    min_charge: int = 0
    request_fee: Decimal = Decimal(0)  # credits per request, e.g. web search
    tiers: tuple[PromptTier, ...] = ()  # ascending above_prompt_tokens
    service_tiers: Mapping[str, ServiceTier] = field(default_factory=dict)
    # "YYYY-MM-DDTHH:MM:SSZ" from when this version applies; None for the rule's
    # undated rates (in force before its first dated version).
    effective_from: str | None = None
    effective_from_ms: int = 0  # the same instant, unix milliseconds (0 when undated)

    def prices(self, permission: str) -> bool:
        """Whether this version prices a price-changing field (config.request_params):
        a request using one it does not price is refused, never billed plainly."""
        if permission == SERVICE_TIER:
            return bool(self.service_tiers)
        if permission == AUDIO:
            every = [self.rates, *(t.rates for t in self.tiers)]
            every += [t.rates for t in self.service_tiers.values() if t.rates is not None]
            return all(r.audio_input is not None and r.audio_output is not None for r in every)
        if permission == WEB_SEARCH:
            return self.request_fee > 0
        return True  # another field: the operator vouched for it in allow_params


@dataclass(frozen=True, slots=True)
class PriceRule:
    """One `price_rules` entry: undated rates, then dated versions in order."""

    id: str
    schedules: tuple[PriceSchedule, ...]  # [0] undated; then ascending effective_from

    def in_force(self, at_unix_ms: int) -> PriceSchedule:
        """The version that applies to a request started at `at_unix_ms`."""
        current = self.schedules[0]
        for schedule in self.schedules[1:]:
            if schedule.effective_from_ms > at_unix_ms:
                break
            current = schedule
        return current

    def version(self, effective_from: str | None) -> PriceSchedule | None:
        """The version an event recorded (None when this rule has no such version)."""
        for schedule in self.schedules:
            if schedule.effective_from == effective_from:
                return schedule
        return None


# What `routing.retry_on` may name: no response head (`connect`), no response head
# within the first-byte bound (`timeout`), and these statuses. Never another 4xx.
RETRY_ON = ("connect", "timeout", "429", "5xx")


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """How an alias's targets are tried (README "Routing"); `routing:` at the top
    level, overridable per alias."""

    # Attempts after the first; None: each candidate target once (no repeat).
    retries: int | None = None
    retry_on: frozenset[str] = frozenset(RETRY_ON)
    backoff_base_ms: float = 100.0  # before retrying a target already tried
    backoff_max_ms: float = 2000.0
    deadline_s: float | None = None  # no attempt starts later than this after arrival
    allowed_fails: int = 3  # failures within window_s that start a cooldown (0: never)
    window_s: float = 30.0
    cooldown_s: float = 30.0
    max_wait_ms: float = 0.0  # wait for a slot of a target at max_concurrency


@dataclass(frozen=True, slots=True)
class Target:
    """One deployment serving an alias: a provider, its model name and price."""

    provider: Provider
    model: str
    price_rule: PriceRule | None  # the alias's unless the target overrides it
    weight: float = 1.0
    priority: int = 0  # lowest first; weighted random within a priority
    max_concurrency: int | None = None  # in-flight exchanges (per process); None: unbounded

    @property
    def key(self) -> str:
        return f"{self.provider.name}/{self.model}"


class OnInsufficient(StrEnum):
    REFUSE = "refuse"  # 402 credit_balance_insufficient
    CLAMP = "clamp"  # lower the output limit to what the credit left affords


class GuardMode(StrEnum):
    RESERVE = "reserve"  # hold the estimate before the call, settle after
    CHECK = "check"  # the original fail-open pre-check ("has any credit?")


class FailPolicy(StrEnum):
    OPEN = "open"  # Redis/the books unreachable: serve (counted, logged)
    CLOSED = "closed"  # ... refuse with 503 guard_unavailable


@dataclass(frozen=True, slots=True)
class Alias:
    name: str
    provider: Provider
    model: str  # the upstream model name
    price_rule: PriceRule | None  # None only when the alias says `free: true`
    tokenizer: str = DEFAULT_ENCODING
    # Price-changing request fields this alias accepts (proxy.config.request_params).
    allow_params: frozenset[str] = frozenset()
    # Opt-in: tell the caller what it was charged (usage.cost, X-Credits-Charged).
    cost_in_band: bool = False
    # The provider's policy with this alias's overrides applied (proxy.config.load).
    disconnect: DisconnectPolicy = DisconnectPolicy()
    # Who serves it: `provider`/`model`/`price_rule` above are the first target's
    # (the one-target shorthand); `targets` is never empty once loaded.
    targets: tuple[Target, ...] = ()
    fallbacks: tuple[str, ...] = ()  # other aliases, tried after every target failed
    routing: RoutingPolicy = RoutingPolicy()
    # The APIs this alias serves (ENDPOINT_NAMES values); others answer 400.
    endpoints: frozenset[str] = DEFAULT_ENDPOINTS

    # Admission (guard.mode: reserve, proxy.billing.estimate): the output allowance
    # reserved when the request names no max_completion_tokens/max_tokens, and what
    # to do when the credit left does not cover the estimate.
    reserve_output_tokens: int = DEFAULT_RESERVE_OUTPUT_TOKENS
    on_insufficient: OnInsufficient = OnInsufficient.REFUSE
    clamp_min_tokens: int = DEFAULT_CLAMP_MIN_TOKENS

    def serves(self, endpoint: str) -> bool:
        """Whether a call of `endpoint` may use this alias (the Responses API also
        needs a provider that speaks it)."""
        if endpoint == "responses" and not self.provider.responses:
            return False
        return endpoint in self.endpoints

    @property
    def price_rule_id(self) -> str:
        return self.price_rule.id if self.price_rule else FREE_RULE_ID


class AuthMode(StrEnum):
    KEYS = "keys"
    NONE = "none"  # local development only: trusts X-User-Id & co. without any key


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """A trusted back-end's key, configured by its sha256 only: the key itself never
    appears in configuration, logs or Redis."""

    name: str
    sha256: bytes  # digest (32 bytes), compared with hmac.compare_digest
    scenes: frozenset[str]  # contains "*" for any scene
    # X-Skip-Charge is a permission of its own, not implied by acting for users.
    may_skip_charge: bool = False

    def allows(self, scene: str) -> bool:
        return ANY_SCENE in self.scenes or scene in self.scenes


@dataclass(frozen=True, slots=True)
class AuthConfig:
    mode: AuthMode = AuthMode.KEYS
    service_keys: tuple[ServiceKey, ...] = ()
    user_key_cache_ttl_s: float = 30.0  # a revoked user key keeps working this long
    user_key_negative_ttl_s: float = 5.0  # a brand-new key is refused at most this long
    user_key_cache_size: int = 10_000
    redis_timeout_s: float = 1.0  # Redis lookup of a user key; then 503


@dataclass(frozen=True, slots=True)
class GuardConfig:
    prefix: str = DEFAULT_PREFIX
    budget_ms: float = 50.0  # the whole check, Redis included; then fail open
    blocked_ttl_s: int = 300
    snapshot_ttl_s: int = 300
    provider_timeout_s: float = 1.0
    fail_open_log_interval_s: float = 60.0
    coalesce: bool = True  # batch concurrent checks into one MGET (bench/bench_guard.py)
    # Keep what was read in process, kept coherent by Redis invalidations
    # (proxy/billing/guard_cache.py); max_age bounds staleness should one be missed.
    local_cache: bool = True
    local_cache_max_age_s: float = 1.0
    local_cache_max_entries: int = 100_000
    mode: GuardMode = GuardMode.RESERVE
    # A hold counts for this long after it was written (at admission, and again
    # from settlement on, to cover the ledger's lag); then it is purged.
    hold_ttl_s: float = DEFAULT_HOLD_TTL_S
    fail: FailPolicy = FailPolicy.OPEN


@dataclass(frozen=True, slots=True)
class ServerConfig:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # In-flight requests get this long to finish on SIGTERM before they are cut
    # (and charged for what was relayed).
    shutdown_grace_s: float = 30.0
    # Time the outbox gets on shutdown to hand pending events to Kafka.
    outbox_drain_s: float = 10.0


@dataclass(frozen=True, slots=True)
class EventsConfig:
    topic: str = "credit.charge.requested"
    partitions: int = 3
    replication_factor: int = 1


@dataclass(frozen=True, slots=True)
class LimitSet:
    """Per-minute requests and tokens, and concurrent requests; None: no limit."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.concurrency is not None


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """`limits:` (README "Rate limits"): defaults per user and per caller key;
    per-user overrides live in Redis (`llm-proxy limits set`)."""

    user: LimitSet = LimitSet()
    key: LimitSet = LimitSet()
    fail_open: bool = True  # Redis unreachable or slow: admit (counted and logged)
    budget_ms: float = 50.0  # the whole check; then the fail policy
    # A concurrency slot a dead proxy never released stops counting after this long.
    slot_ttl_s: float = 900.0
    fail_log_interval_s: float = 60.0
    # A `limits:` section is given: every request runs the check (needs REDIS_URL),
    # which also applies the per-user overrides even without defaults.
    enabled: bool = False


@dataclass(frozen=True, slots=True)
class YamlConfig:
    """Everything `model_aliases.yaml` says: what is served, priced and allowed."""

    path: str
    providers: Mapping[str, Provider]
    price_rules: Mapping[str, PriceRule]
    aliases: Mapping[str, Alias]
    auth: AuthConfig
    guard: GuardConfig
    events: EventsConfig
    server: ServerConfig
    routing: RoutingPolicy = RoutingPolicy()
    limits: LimitsConfig = LimitsConfig()
    store: StoreConfig = field(default_factory=StoreConfig)  # packages, rewards (credit API)
