"""`llm-proxy ledger | credits | keys`: argument parsing and printing only.

Where things are: `--redis-url` or env `REDIS_URL` (default redis://127.0.0.1:6379/0),
`--bootstrap` or env `KAFKA_BOOTSTRAP_SERVERS`; the key prefix and the topic come from
the config file (`--config`, env `LLM_PROXY_CONFIG`, or `model_aliases.yaml`) unless
`--prefix` / `--topic` are given. A missing *default* config file falls back to the
defaults (with a note on stderr) so the admin commands work on a bare host.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.config import EnvSettings, EventsConfig, load_config
from proxy.config.env import DEFAULT_REDIS_URL
from proxy.contract.payers import check_user_id
from proxy.contract.redis_keys import DEFAULT_PREFIX
from proxy.errors import ConfigError
from proxy.ledger.apikeys import ApiKeyStore
from proxy.ledger.consumer import DEFAULT_GROUP_ID, LedgerSettings, run_ledger
from proxy.ledger.store import CreditStore, LedgerEntry

DEFAULT_TOPIC = EventsConfig().topic


@dataclass(frozen=True, slots=True)
class Resolved:
    prefix: str
    topic: str
    redis_url: str
    bootstrap: str | None
    idempotent_producer: bool


def command(
    fn: Callable[[argparse.Namespace, Resolved], int],
) -> Callable[[argparse.Namespace, EnvSettings], int]:
    """Resolve config once; a bad config file is an exit code, not a traceback."""

    def run(args: argparse.Namespace, settings: EnvSettings) -> int:
        try:
            resolved = _resolve(args, settings)
        except ConfigError as exc:
            return fail(str(exc))
        return fn(args, resolved)

    return run


@dataclass(frozen=True, slots=True)
class CreditsParsers:
    """What proxy.cli needs to add `credits` sub-commands that are not the ledger's own
    (`credits rerate` prices, which the ledger may not import)."""

    subparsers: argparse._SubParsersAction[argparse.ArgumentParser]
    common: argparse.ArgumentParser


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: Sequence[argparse.ArgumentParser] = (),
) -> CreditsParsers:
    """`parents`: options every command takes (the CLI's --log-level)."""
    common = argparse.ArgumentParser(add_help=False, parents=list(parents))
    common.add_argument("--config", help="config file (env LLM_PROXY_CONFIG)")
    common.add_argument("--redis-url", help="env REDIS_URL, default " + DEFAULT_REDIS_URL)
    common.add_argument("--prefix", help="Redis key prefix (default: guard.prefix)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    p = subparsers.add_parser(
        "ledger", parents=[common], help="consume charge events into the Redis ledger"
    )
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--topic", help="charge topic (default: events.topic)")
    p.add_argument("--group-id", default=DEFAULT_GROUP_ID)
    p.add_argument("--dlq-topic", help="dead-letter topic (default: <topic>.dlq)")
    p.add_argument("--applied-ttl", type=_positive_int, default=7 * 24 * 3600, metavar="S")
    p.add_argument("--stream-maxlen", type=_positive_int, default=10_000, metavar="N")
    p.add_argument(
        "--blocked-ttl", type=_nonneg_int, default=0, metavar="S", help="0 = until a grant"
    )
    p.set_defaults(func=command(_cmd_ledger))

    credits = subparsers.add_parser("credits", help="grant and inspect credit balances")
    csub = credits.add_subparsers(dest="credits_command", required=True)
    g = csub.add_parser("grant", parents=[common], help="add credits (unblocks at > 0)")
    g.add_argument("user", type=_user_id)
    g.add_argument("amount", type=_positive_int)
    g.add_argument("--reason", default="")
    g.add_argument("--id", dest="grant_id", help="idempotency key: a repeated id is a no-op")
    g.set_defaults(func=command(_cmd_grant))
    s = csub.add_parser("show", parents=[common], help="balance, blocked, last entries")
    s.add_argument("user", type=_user_id)
    s.add_argument("--limit", type=_nonneg_int, default=5)
    s.set_defaults(func=command(_cmd_show))
    lg = csub.add_parser("ledger", parents=[common], help="ledger entries, newest first")
    lg.add_argument("user", type=_user_id)
    lg.add_argument("--limit", type=_nonneg_int, default=20)
    lg.set_defaults(func=command(_cmd_entries))

    keys = subparsers.add_parser("keys", help="user API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", parents=[common], help="create a key (printed once)")
    kc.add_argument("--user", type=_user_id, required=True)
    kc.set_defaults(func=command(_cmd_key_create))
    kr = ksub.add_parser("revoke", parents=[common], help="revoke a key")
    kr.add_argument(
        "key", nargs="?", help="the key itself, or - to read it from stdin (keeps it out of ps)"
    )
    kr.add_argument("--sha256", help="the key's SHA-256 hex")
    kr.set_defaults(func=command(_cmd_key_revoke))
    kl = ksub.add_parser("list", parents=[common], help="a user's key hashes")
    kl.add_argument("--user", type=_user_id, required=True)
    kl.set_defaults(func=command(_cmd_key_list))
    return CreditsParsers(csub, common)


# -- commands --------------------------------------------------------------------


def _cmd_ledger(args: argparse.Namespace, r: Resolved) -> int:
    if not r.bootstrap:
        return fail("ledger: no Kafka bootstrap servers (--bootstrap or KAFKA_BOOTSTRAP_SERVERS)")
    settings = LedgerSettings(
        topic=r.topic,
        bootstrap=r.bootstrap,
        group_id=args.group_id,
        dlq_topic=args.dlq_topic,
        prefix=r.prefix,
        stream_maxlen=args.stream_maxlen,
        applied_ttl_s=args.applied_ttl,
        blocked_ttl_s=args.blocked_ttl,
        idempotent_producer=r.idempotent_producer,
    )
    print(
        f"ledger: consuming {settings.topic} as group {settings.group_id}, "
        f"dead letters to {settings.dead_letter_topic}",
        file=sys.stderr,
    )

    async def run(redis: Redis) -> int:
        stats = await run_ledger(settings, redis)
        emit(
            args,
            {"applied": stats.applied, "duplicates": stats.duplicates, "dlq": stats.dead_lettered},
            f"ledger stopped: {stats.applied} applied, {stats.duplicates} duplicates, "
            f"{stats.dead_lettered} dead-lettered",
        )
        return 0

    return with_redis(r, run)


def _cmd_grant(args: argparse.Namespace, r: Resolved) -> int:
    async def run(redis: Redis) -> int:
        store = CreditStore(redis, prefix=r.prefix)
        change = await store.grant(
            args.user, args.amount, reason=args.reason, grant_id=args.grant_id
        )
        text = (
            f"user {args.user}: +{args.amount} credits, balance {change.balance}"
            if change.applied
            else f"user {args.user}: grant id {args.grant_id!r} already applied, "
            f"balance {change.balance}"
        )
        data = {"user_id": args.user, "applied": change.applied, "balance": change.balance}
        emit(args, data, text)
        return 0

    return with_redis(r, run)


def _cmd_show(args: argparse.Namespace, r: Resolved) -> int:
    async def run(redis: Redis) -> int:
        state = await CreditStore(redis, prefix=r.prefix).show(args.user, args.limit)
        blocked = "no"
        if state.blocked:
            blocked = "yes" if state.blocked_ttl_s is None else f"yes ({state.blocked_ttl_s}s)"
        lines = [f"user {state.user_id}", f"balance  {state.balance}", f"blocked  {blocked}"]
        lines += _entry_lines(state.entries)
        emit(args, state.as_dict(), "\n".join(lines))
        return 0

    return with_redis(r, run)


def _cmd_entries(args: argparse.Namespace, r: Resolved) -> int:
    async def run(redis: Redis) -> int:
        entries = await CreditStore(redis, prefix=r.prefix).entries(args.user, args.limit)
        emit(args, [e.as_dict() for e in entries], "\n".join(_entry_lines(entries)))
        return 0

    return with_redis(r, run)


def _cmd_key_create(args: argparse.Namespace, r: Resolved) -> int:
    async def run(redis: Redis) -> int:
        created = await ApiKeyStore(redis, prefix=r.prefix).create(args.user)
        data = {"api_key": created.api_key, "sha256": created.sha256, "user_id": args.user}
        text = (
            f"{created.api_key}\n"
            f"(user {args.user}, sha256 {created.sha256}; the key is shown only this once)"
        )
        emit(args, data, text)
        return 0

    return with_redis(r, run)


def _cmd_key_revoke(args: argparse.Namespace, r: Resolved) -> int:
    if (args.key is None) == (args.sha256 is None):
        return fail("keys revoke: give the key or --sha256 HASH (exactly one)")

    api_key = sys.stdin.readline().strip() if args.key == "-" else args.key

    async def run(redis: Redis) -> int:
        store = ApiKeyStore(redis, prefix=r.prefix)
        try:
            user = await store.revoke(api_key=api_key, sha256=args.sha256)
        except ValueError as exc:
            return fail(f"keys revoke: {exc}")
        if user is None:
            emit(args, {"revoked": False}, "no such key")
            return 1
        text = f"revoked (user {user}); proxies may accept it for up to ~30 s from cache"
        emit(args, {"revoked": True, "user_id": user}, text)
        return 0

    return with_redis(r, run)


def _cmd_key_list(args: argparse.Namespace, r: Resolved) -> int:
    async def run(redis: Redis) -> int:
        infos = await ApiKeyStore(redis, prefix=r.prefix).list(args.user)
        data = [{"sha256": i.sha256, "created_at": i.created_at} for i in infos]
        text = "\n".join(f"{i.created_at}  {i.sha256}" for i in infos) or "no keys"
        emit(args, data, text)
        return 0

    return with_redis(r, run)


# -- plumbing --------------------------------------------------------------------


def _resolve(args: argparse.Namespace, settings: EnvSettings) -> Resolved:
    prefix: str | None = args.prefix
    topic: str | None = getattr(args, "topic", None)
    if prefix is None or (topic is None and hasattr(args, "topic")):
        cfg_prefix, cfg_topic = _from_config(settings, args.config)
        prefix = prefix if prefix is not None else cfg_prefix
        topic = topic or cfg_topic
    return Resolved(
        prefix=prefix,
        topic=topic or DEFAULT_TOPIC,
        redis_url=args.redis_url or settings.redis_url or DEFAULT_REDIS_URL,
        bootstrap=getattr(args, "bootstrap", None) or settings.kafka_bootstrap,
        idempotent_producer=settings.kafka_idempotent,
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


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
    else:
        print(text)


def fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def _entry_lines(entries: Iterable[LedgerEntry]) -> list[str]:
    lines = []
    for e in entries:
        sign = "-" if e.kind == "charge" else "+"
        ref = e.event_id or e.reason or ""
        lines.append(f"{e.at}  {e.kind:<6} {sign}{e.amount:<10} = {e.balance_after:<12} {ref}")
    return lines


def _nonneg_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {raw!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(raw: str) -> int:
    value = _nonneg_int(raw)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _user_id(raw: str) -> int:
    value = _nonneg_int(raw)
    try:
        check_user_id(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value
