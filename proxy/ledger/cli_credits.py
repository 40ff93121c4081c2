"""`llm-proxy credits grant|adjust|show|ledger|usage`: against the database of record.

Grants and adjustments also rewrite the user's Redis projection when a Redis URL
is given, so a top-up unblocks at once; the database is written first and is the
authority (a failed projection write is a warning, repaired by
`llm-proxy ledger rebuild-projection`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.contract.redis_keys import RedisKeys, live_held
from proxy.ledger.book import ADJUST_FLOOR, Book, Change, adjust, grant
from proxy.ledger.cli_common import (
    Resolved,
    command,
    nonneg_int,
    out,
    positive_int,
    signed_int,
    user_id,
    with_ledger,
)
from proxy.ledger.projection import RedisClient
from proxy.ledger.reads import MAX_PAGE, PERIODS, Entry, Reader


def register_credits(
    csub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    g = csub.add_parser("grant", parents=[common], help="add credits (unblocks at > 0)")
    g.add_argument("user", type=user_id)
    g.add_argument("amount", type=positive_int)
    g.add_argument("--id", dest="key", required=True, help="idempotency key (e.g. payment id)")
    g.add_argument("--reason", default="")
    g.set_defaults(func=command(_cmd_grant))

    a = csub.add_parser(
        "adjust", parents=[common], help=f"operator correction (floor {ADJUST_FLOOR})"
    )
    a.add_argument("user", type=user_id)
    a.add_argument("amount", type=signed_int, help="+N or -N credits")
    a.add_argument("--id", dest="key", required=True, help="idempotency key")
    a.add_argument("--reason", required=True)
    a.add_argument(
        "--allow-negative", action="store_true", help=f"allow a balance below {ADJUST_FLOOR}"
    )
    a.set_defaults(func=command(_cmd_adjust))

    s = csub.add_parser("show", parents=[common], help="balance, totals, last entries")
    s.add_argument("user", type=user_id)
    s.add_argument("--limit", type=nonneg_int, default=5, help="entries shown")
    s.set_defaults(func=command(_cmd_show))

    lg = csub.add_parser("ledger", parents=[common], help="history, newest first, paged")
    lg.add_argument("user", type=user_id)
    lg.add_argument("--limit", type=_page_size, default=20)
    lg.add_argument("--cursor", help="next_cursor of the previous page")
    lg.set_defaults(func=command(_cmd_history))

    u = csub.add_parser("usage", parents=[common], help="consumption over a period")
    u.add_argument("user", type=user_id)
    u.add_argument("--period", choices=list(PERIODS), default="30d")
    u.set_defaults(func=command(_cmd_usage))


def _page_size(raw: str) -> int:
    value = positive_int(raw)
    if value > MAX_PAGE:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_PAGE}")
    return value


def _cmd_grant(args: argparse.Namespace, r: Resolved) -> int:
    async def run(engine: AsyncEngine, redis: RedisClient | None) -> int:
        change = await grant(Book(engine), args.user, args.amount, args.key, args.reason)
        await _project(r, redis, args.user, change)
        _changed(args, change, f"+{args.amount}")
        return 0

    return with_ledger(r, run)


def _cmd_adjust(args: argparse.Namespace, r: Resolved) -> int:
    async def run(engine: AsyncEngine, redis: RedisClient | None) -> int:
        change = await adjust(
            Book(engine),
            args.user,
            args.amount,
            args.key,
            args.reason,
            allow_negative=args.allow_negative,
        )
        await _project(r, redis, args.user, change)
        _changed(args, change, f"{args.amount:+d}")
        return 0

    return with_ledger(r, run)


async def _project(r: Resolved, redis: RedisClient | None, user: int, change: Change) -> None:
    projection = r.projection(redis)
    if projection is None:
        return
    try:
        await projection.write([(user, change.balance)])
    except (RedisError, OSError) as exc:
        print(
            f"warning: Redis projection not updated ({exc}); "
            "run `llm-proxy ledger rebuild-projection`",
            file=sys.stderr,
        )


def _changed(args: argparse.Namespace, change: Change, what: str) -> None:
    text = (
        f"user {args.user}: {what} credits, balance {change.balance}"
        if change.applied
        else f"user {args.user}: id {args.key!r} already applied, balance {change.balance}"
    )
    data = {"user_id": args.user, "applied": change.applied, "balance": change.balance}
    out(args, data, text)


def _cmd_show(args: argparse.Namespace, r: Resolved) -> int:
    async def run(engine: AsyncEngine, redis: RedisClient | None) -> int:
        reader = Reader(engine)
        account = await reader.account(args.user)
        recent = (await reader.history(args.user, args.limit)).entries if args.limit else ()
        held, why = await _held(r, redis, args.user)
        held_line = (
            f"held     unknown ({why})"
            if held is None
            else f"held     {held} (requests in progress; available {account.balance - held})"
        )
        lines = [
            f"user {account.user_id}",
            f"balance  {account.balance}",
            held_line,
            f"blocked  {'yes' if account.is_blocked else 'no'}",
            f"charged  {account.lifetime_charged} (lifetime)",
            f"granted  {account.lifetime_granted} (lifetime)",
            *_entry_lines(recent),
        ]
        data = {**account.as_dict(), "held": held, "entries": [e.as_dict() for e in recent]}
        out(args, data, "\n".join(lines))
        return 0

    return with_ledger(r, run)


async def _held(r: Resolved, redis: RedisClient | None, user: int) -> tuple[int | None, str]:
    """Credit reserved by the user's requests in progress (or settled and not yet
    applied): the live holds in Redis, by the Redis clock."""
    if redis is None:
        return None, "no Redis given: --redis-url or REDIS_URL"
    try:
        values = await redis.hvals(RedisKeys(r.prefix).holds(user))
        seconds, micros = await redis.time()
    except (RedisError, OSError) as exc:
        return None, f"Redis: {type(exc).__name__}"
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return live_held(values, now_ms), ""


def _cmd_history(args: argparse.Namespace, r: Resolved) -> int:
    async def run(engine: AsyncEngine, _redis: RedisClient | None) -> int:
        page = await Reader(engine).history(args.user, args.limit, args.cursor)
        lines = _entry_lines(page.entries)
        if page.next_cursor is not None:
            lines.append(f"(more: --cursor {page.next_cursor})")
        out(args, page.as_dict(), "\n".join(lines) or "no entries")
        return 0

    return with_ledger(r, run, redis=None)


def _cmd_usage(args: argparse.Namespace, r: Resolved) -> int:
    async def run(engine: AsyncEngine, _redis: RedisClient | None) -> int:
        usage = await Reader(engine).usage(args.user, args.period)
        t = usage["tokens"]
        lines = [
            f"user {args.user}, last {args.period}: {usage['credits']} credits, "
            f"{usage['requests']} requests, {t['total']} tokens "
            f"(prompt {t['prompt']}, completion {t['completion']}, cached {t['cached']}, "
            f"reasoning {t['reasoning']})"
        ]
        for title in ("by_alias", "by_scene", "by_endpoint"):
            for name, part in sorted(usage[title].items()):
                lines.append(
                    f"  {title[3:]} {name}: {part['credits']} credits, {part['requests']} requests"
                )
        out(args, usage, "\n".join(lines))
        return 0

    return with_ledger(r, run, redis=None)


def _entry_lines(entries: Iterable[Entry]) -> list[str]:
    return [
        f"{e.occurred_at}  {e.kind:<10} {e.amount:<+12d} = {e.balance_after:<14} "
        f"{e.reason or e.request_id or ''}"
        for e in entries
    ]
