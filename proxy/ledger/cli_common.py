"""What the ledger's commands share: resolving where things are, running against the
database and Redis with one-line errors, printing text or JSON, argument types.

Where things are: `--database-url` or env `LEDGER_DATABASE_URL` (default
sqlite:///data/ledger.sqlite3); `--redis-url` or env `REDIS_URL` (the projection is
written only when one is given; `keys` and `rebuild-projection` fall back to
redis://127.0.0.1:6379/0); `--bootstrap` or env `KAFKA_BOOTSTRAP_SERVERS`; the key
prefix and the topic come from the config file (`--config`, env `LLM_PROXY_CONFIG`,
or `model_aliases.yaml`) unless `--prefix` / `--topic` are given. A missing
*default* config file falls back to the defaults (with a note on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.config import EnvSettings, EventsConfig, load_config
from proxy.config.env import DEFAULT_REDIS_URL
from proxy.contract.payers import check_user_id
from proxy.contract.redis_keys import DEFAULT_PREFIX
from proxy.errors import ConfigError, LedgerNotMigrated
from proxy.ledger.database import open_engine, require_migrated
from proxy.ledger.projection import Projection, RedisClient

DEFAULT_TOPIC = EventsConfig().topic


@dataclass(frozen=True, slots=True)
class Resolved:
    prefix: str
    topic: str
    redis_url: str  # with the fallback, for commands that need Redis
    projection_url: str | None  # only what was given: where to project, if anywhere
    bootstrap: str | None
    idempotent_producer: bool
    database_url: str
    redis_cluster: bool = False

    def projection(self, redis: RedisClient | None) -> Projection | None:
        return None if redis is None else Projection(redis, self.prefix)


Command = Callable[[argparse.Namespace, Resolved], int]


def command(fn: Command) -> Callable[[argparse.Namespace, EnvSettings], int]:
    """Resolve config once; a bad config file is an exit code, not a traceback."""

    def run(args: argparse.Namespace, settings: EnvSettings) -> int:
        try:
            resolved = resolve(args, settings)
        except ConfigError as exc:
            return fail(str(exc))
        return fn(args, resolved)

    return run


def common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (env LLM_PROXY_CONFIG)")
    common.add_argument("--redis-url", help="env REDIS_URL")
    common.add_argument("--database-url", help="env LEDGER_DATABASE_URL")
    common.add_argument("--prefix", help="Redis key prefix (default: guard.prefix)")
    common.add_argument(
        "--redis-cluster", action="store_true", help="the Redis URL is a Redis Cluster node"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def resolve(args: argparse.Namespace, settings: EnvSettings) -> Resolved:
    prefix: str | None = args.prefix
    topic: str | None = getattr(args, "topic", None)
    if prefix is None or (topic is None and hasattr(args, "topic")):
        cfg_prefix, cfg_topic = _from_config(settings, args.config)
        prefix = prefix if prefix is not None else cfg_prefix
        topic = topic or cfg_topic
    given_redis = getattr(args, "redis_url", None) or settings.redis_url
    return Resolved(
        prefix=prefix,
        topic=topic or DEFAULT_TOPIC,
        redis_url=given_redis or DEFAULT_REDIS_URL,
        projection_url=given_redis,
        bootstrap=getattr(args, "bootstrap", None) or settings.kafka_bootstrap,
        idempotent_producer=settings.kafka_idempotent,
        database_url=getattr(args, "database_url", None) or settings.ledger_database_url,
        redis_cluster=bool(getattr(args, "redis_cluster", False)),
    )


def _from_config(settings: EnvSettings, cli_path: str | None) -> tuple[str, str]:
    path = settings.config_file(cli_path)
    explicit = cli_path is not None or settings.config_path is not None
    if not explicit and not os.path.exists(path):
        print(f"note: {path} not found, using the default prefix and topic", file=sys.stderr)
        return DEFAULT_PREFIX, DEFAULT_TOPIC
    config = load_config(path)
    return config.guard.prefix, config.events.topic


def with_redis(resolved: Resolved, body: Callable[[Redis], Awaitable[int]]) -> int:
    async def main() -> int:
        redis = Redis.from_url(resolved.redis_url)
        try:
            return await body(redis)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(main())
    except RedisError as exc:
        return fail(f"redis: {exc}")


LedgerBody = Callable[[AsyncEngine, RedisClient | None], Awaitable[int]]


def with_ledger(
    resolved: Resolved,
    body: LedgerBody,
    *,
    migrated: bool = True,
    redis: str | None = "given",
) -> int:
    """Run `body(engine, redis)`; `redis`: "given" = the projection's Redis if one
    was given, "always" = with the fallback, None = none. Database, Redis and
    validation errors end as one line and exit 2."""

    async def main() -> int:
        engine = open_engine(resolved.database_url)
        url = resolved.redis_url if redis == "always" else resolved.projection_url
        client: RedisClient | None = None
        if redis is not None and url:
            client = RedisCluster.from_url(url) if resolved.redis_cluster else Redis.from_url(url)
        try:
            if migrated:
                await require_migrated(engine)
            return await body(engine, client)
        finally:
            if client is not None:
                await client.aclose()
            await engine.dispose()

    try:
        return asyncio.run(main())
    except (LedgerNotMigrated, ConfigError, ValueError) as exc:
        return fail(str(exc))
    except RedisError as exc:
        return fail(f"redis: {exc}")
    except (SQLAlchemyError, OSError) as exc:
        return fail(f"database: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def out(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
    else:
        print(text)


def fail(message: str) -> int:
    print(message.replace("\n", " "), file=sys.stderr)
    return 2


def _whole(raw: str, ok: Callable[[int], bool] = lambda _: True, want: str = "") -> int:
    """One wording for every integer argument: `must be a whole number >= 1, got '0'`."""
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be a whole number{want}, got {raw!r}")
    return value


def nonneg_int(raw: str) -> int:
    return _whole(raw, lambda v: v >= 0, " >= 0")


def positive_int(raw: str) -> int:
    return _whole(raw, lambda v: v >= 1, " >= 1")


def signed_int(raw: str) -> int:
    return _whole(raw, lambda v: v != 0, " other than 0")


def user_id(raw: str) -> int:
    value = _whole(raw)
    try:
        check_user_id(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value
