"""The environment: the only module that reads environment variables.

Everything that says *where* infrastructure is or holds a secret comes from here
(Redis, Kafka, provider keys, file paths), so one YAML file can travel between
environments unchanged. Read once, at start-up, into a frozen `EnvSettings`.

| variable | meaning | default |
|---|---|---|
| `LLM_PROXY_CONFIG` | the YAML file | `model_aliases.yaml` |
| `REDIS_URL` | user keys, guard | none (guard off, service keys only) |
| `LLM_PROXY_REDIS_CLUSTER` | `REDIS_URL` is a node of a Redis Cluster | false |
| `CREDIT_SNAPSHOT_URL` | snapshot provider the guard asks on a miss | none |
| `KAFKA_BOOTSTRAP_SERVERS` | charge events to Kafka | none (JSON-lines file) |
| `LLM_PROXY_KAFKA_IDEMPOTENCE` | idempotent producer | true |
| `LLM_PROXY_OUTBOX_PATH` | the outbox file | `data/outbox.sqlite3` |
| `LLM_PROXY_SINK_PATH` | JSON-lines sink (no Kafka, no embedded) | `data/charge-events.jsonl` |
| `LEDGER_DATABASE_URL` | ledger database (`postgresql://…`) | `sqlite:///data/ledger.sqlite3` |
| `LLM_PROXY_EMBEDDED_LEDGER` | without Kafka, apply charges to the embedded ledger | on |
| `CREDIT_WEBHOOK_SECRET` | HMAC-SHA256 secret of the payment webhook | none (webhook off) |
| `LLM_PROXY_METERING` | `off`: benchmark switch, streams unmetered (1 token) | on |
| `LLM_PROXY_WORKERS` | `serve --workers` default | 1 |
| `LLM_PROXY_WORKER` | set by `serve --workers` in each worker: its index | none |
| `LOG_LEVEL` | `--log-level` default | info |
| `PROMETHEUS_MULTIPROC_DIR` | merged metrics of several processes | none |
| provider `api_key_env` | each provider's key, named in the YAML | none |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.config.readers import flag_word
from proxy.errors import ConfigError

DEFAULT_CONFIG_FILE = "model_aliases.yaml"
DEFAULT_OUTBOX_PATH = "data/outbox.sqlite3"
DEFAULT_SINK_PATH = "data/charge-events.jsonl"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"  # the admin CLI's fallback only
DEFAULT_LEDGER_DATABASE_URL = "sqlite:///data/ledger.sqlite3"
LEDGER_DATABASE_ENV = "LEDGER_DATABASE_URL"
EMBEDDED_LEDGER_ENV = "LLM_PROXY_EMBEDDED_LEDGER"

CONFIG_ENV = "LLM_PROXY_CONFIG"
OUTBOX_PATH_ENV = "LLM_PROXY_OUTBOX_PATH"
SINK_PATH_ENV = "LLM_PROXY_SINK_PATH"
IDEMPOTENCE_ENV = "LLM_PROXY_KAFKA_IDEMPOTENCE"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_ENV = "LLM_PROXY_WORKER"
WEBHOOK_SECRET_ENV = "CREDIT_WEBHOOK_SECRET"
REDIS_CLUSTER_ENV = "LLM_PROXY_REDIS_CLUSTER"


def env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A boolean variable; unset or blank is `default`, anything unrecognised an error."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    value = flag_word(raw)
    if value is None:
        raise ConfigError(f"{name}: must be true or false, got {raw.lower()!r}")
    return value


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _redis_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(_REDIS_SCHEMES):
        raise ConfigError(
            f"REDIS_URL: must start with redis://, rediss:// or unix://, got {value[:40]!r}"
        )
    return value


def _log_level(value: str | None) -> str:
    level = (value or "info").lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL: must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


@dataclass(frozen=True, slots=True)
class EnvSettings:
    """Infrastructure endpoints, paths and secrets, from the environment only."""

    redis_url: str | None = None
    # REDIS_URL names one node of a Redis Cluster (the guard, reservations and user
    # keys then use a cluster client; the guard's local cache and MGET coalescing,
    # which need one node, are off).
    redis_cluster: bool = False
    kafka_bootstrap: str | None = None
    # Brokers that reject idempotent producers (tansu's in-memory store) need false.
    kafka_idempotent: bool = True
    credit_snapshot_url: str | None = None
    outbox_path: str = DEFAULT_OUTBOX_PATH
    sink_path: str = DEFAULT_SINK_PATH
    ledger_database_url: str = DEFAULT_LEDGER_DATABASE_URL
    # Without Kafka: apply charge events to the embedded ledger (off: JSON-lines file).
    embedded_ledger: bool = True
    # Benchmark switch only (LLM_PROXY_METERING=off): streamed replies are relayed
    # without the meter and charged a nominal 1 token; bench/bench_metering.py
    # measures what metering costs against it.
    metering: bool = True
    # The payment provider's webhook secret (credit API: `POST /v1/credit/orders/{id}/paid`).
    credit_webhook_secret: str | None = field(default=None, repr=False)
    config_path: str | None = None  # LLM_PROXY_CONFIG as given (None: not set)
    log_level: str = "info"
    workers: str = "1"  # parsed by the CLI, which owns the error message
    worker_index: int | None = None  # set in each worker of `serve --workers N`
    metrics_dir: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EnvSettings:
        env = os.environ if env is None else env

        def opt(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        worker = opt(WORKER_ENV)
        return cls(
            redis_url=_redis_url(opt("REDIS_URL")),
            redis_cluster=env_flag(env, REDIS_CLUSTER_ENV, False),
            kafka_bootstrap=opt("KAFKA_BOOTSTRAP_SERVERS"),
            kafka_idempotent=env_flag(env, IDEMPOTENCE_ENV, True),
            credit_snapshot_url=opt("CREDIT_SNAPSHOT_URL"),
            outbox_path=opt(OUTBOX_PATH_ENV) or DEFAULT_OUTBOX_PATH,
            sink_path=opt(SINK_PATH_ENV) or DEFAULT_SINK_PATH,
            ledger_database_url=opt(LEDGER_DATABASE_ENV) or DEFAULT_LEDGER_DATABASE_URL,
            embedded_ledger=env_flag(env, EMBEDDED_LEDGER_ENV, True),
            metering=env_flag(env, "LLM_PROXY_METERING", True),
            credit_webhook_secret=opt(WEBHOOK_SECRET_ENV),
            config_path=opt(CONFIG_ENV),
            log_level=_log_level(opt("LOG_LEVEL")),
            workers=opt("LLM_PROXY_WORKERS") or "1",
            worker_index=int(worker) if worker and worker.isdigit() else None,
            metrics_dir=opt(MULTIPROC_ENV),
        )

    def config_file(self, cli_value: str | None = None) -> str:
        """`--config` wins, then `LLM_PROXY_CONFIG`, then `model_aliases.yaml`."""
        return cli_value or self.config_path or DEFAULT_CONFIG_FILE


def read_var(name: str) -> str | None:
    """One variable of the process environment (provider keys named in the YAML)."""
    return os.environ.get(name) or None
