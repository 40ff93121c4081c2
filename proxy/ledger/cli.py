"""`llm-proxy ledger | credits | keys`: argument parsing and printing only.

The consumer and database commands are in proxy.ledger.cli_ledger, the credit
commands in proxy.ledger.cli_credits, what they share (where things are, errors,
output) in proxy.ledger.cli_common; the user API keys (kept in Redis, where the
proxy looks them up) are here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from proxy.ledger.apikeys import ApiKeyStore
from proxy.ledger.cli_common import (
    Resolved,
    command,
    common_parser,
    fail,
    out,
    user_id,
    with_redis,
)
from proxy.ledger.cli_credits import register_credits
from proxy.ledger.cli_ledger import register_ledger


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
    common = argparse.ArgumentParser(add_help=False, parents=[*parents, common_parser()])
    register_ledger(subparsers, common)

    credits = subparsers.add_parser("credits", help="grant, adjust and inspect credit balances")
    csub = credits.add_subparsers(dest="credits_command", required=True, metavar="COMMAND")
    register_credits(csub, common)

    keys = subparsers.add_parser("keys", help="user API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    kc = ksub.add_parser("create", parents=[common], help="create a key (printed once)")
    kc.add_argument("--user", type=user_id, required=True)
    kc.set_defaults(func=command(_cmd_key_create))
    kr = ksub.add_parser("revoke", parents=[common], help="revoke a key")
    kr.add_argument(
        "key", nargs="?", help="the key itself, or - to read it from stdin (keeps it out of ps)"
    )
    kr.add_argument("--sha256", help="the key's SHA-256 hex")
    kr.set_defaults(func=command(_cmd_key_revoke))
    kl = ksub.add_parser("list", parents=[common], help="a user's key hashes")
    kl.add_argument("--user", type=user_id, required=True)
    kl.set_defaults(func=command(_cmd_key_list))
    return CreditsParsers(csub, common)


# -- commands --------------------------------------------------------------------


def _cmd_key_create(args: argparse.Namespace, r: Resolved) -> int:
    async def run(redis: Redis) -> int:
        created = await ApiKeyStore(redis, prefix=r.prefix).create(args.user)
        data = {"api_key": created.api_key, "sha256": created.sha256, "user_id": args.user}
        text = (
            f"{created.api_key}\n"
            f"(user {args.user}, sha256 {created.sha256}; the key is shown only this once)"
        )
        out(args, data, text)
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
            out(args, {"revoked": False}, "no such key")
            return 1
        text = f"revoked (user {user}); proxies may accept it for up to ~30 s from cache"
        out(args, {"revoked": True, "user_id": user}, text)
        return 0

    return with_redis(r, run)


def _cmd_key_list(args: argparse.Namespace, r: Resolved) -> int:
    async def run(redis: Redis) -> int:
        infos = await ApiKeyStore(redis, prefix=r.prefix).list(args.user)
        data = [{"sha256": i.sha256, "created_at": i.created_at} for i in infos]
        text = "\n".join(f"{i.created_at}  {i.sha256}" for i in infos) or "no keys"
        out(args, data, text)
        return 0

    return with_redis(r, run)
