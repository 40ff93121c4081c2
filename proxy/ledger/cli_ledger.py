"""`llm-proxy ledger [migrate | rebuild-projection]`: the consumer process and the
database's maintenance commands."""

from __future__ import annotations

import argparse
import sys

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.contract.timestamps import format_timestamp
from proxy.ledger.api import build_api
from proxy.ledger.book import Book
from proxy.ledger.cli_common import Resolved, command, fail, out, positive_int, with_ledger
from proxy.ledger.consumer import DEFAULT_GROUP_ID, LedgerSettings, run_ledger
from proxy.ledger.database import migrate
from proxy.ledger.dead_letters import list_dead_letters, replay
from proxy.ledger.metrics import LedgerMetrics
from proxy.ledger.projection import RedisClient
from proxy.ledger.reads import Reader


def register_ledger(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = subparsers.add_parser(
        "ledger", parents=[common], help="consume charge events into the database of record"
    )
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--topic", help="charge topic (default: events.topic)")
    p.add_argument("--group-id", default=DEFAULT_GROUP_ID)
    p.add_argument("--dlq-topic", help="dead-letter topic (default: <topic>.dlq)")
    p.add_argument("--max-batch", type=positive_int, default=1000, help="events per transaction")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=_host_port,
        help="also serve GET /users/{id}/credit-snapshot (the guard's CREDIT_SNAPSHOT_URL), "
        "/healthz and the consumer's Prometheus /metrics (default: not served)",
    )
    p.set_defaults(func=command(_cmd_consume))
    lsub = p.add_subparsers(dest="ledger_command", metavar="COMMAND")
    m = lsub.add_parser("migrate", parents=[common], help="create or upgrade the schema")
    m.set_defaults(func=command(_cmd_migrate))
    rb = lsub.add_parser(
        "rebuild-projection", parents=[common], help="rewrite every user's Redis keys"
    )
    rb.set_defaults(func=command(_cmd_rebuild))
    dl = lsub.add_parser(
        "dead-letters",
        parents=[common],
        help="list the events the embedded ledger could not apply (reason, no payload)",
    )
    dl.add_argument("--limit", type=positive_int, default=50, help="rows shown (oldest first)")
    dl.set_defaults(func=command(_cmd_dead_letters))
    rp = lsub.add_parser(
        "replay-dead-letters",
        parents=[common],
        help="re-apply dead letters once their cause is fixed (idempotent)",
    )
    rp.add_argument(
        "ids", nargs="*", type=positive_int, help="dead-letter ids (default: every one)"
    )
    rp.set_defaults(func=command(_cmd_replay))


def _host_port(raw: str) -> tuple[str, int]:
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {raw!r}")
    return host, int(port)


def _cmd_consume(args: argparse.Namespace, r: Resolved) -> int:
    if not r.bootstrap:
        return fail("ledger: no Kafka bootstrap servers (--bootstrap or KAFKA_BOOTSTRAP_SERVERS)")
    settings = LedgerSettings(
        topic=r.topic,
        bootstrap=r.bootstrap,
        group_id=args.group_id,
        dlq_topic=args.dlq_topic,
        idempotent_producer=r.idempotent_producer,
        max_batch=args.max_batch,
    )
    print(
        f"ledger: consuming {settings.topic} as group {settings.group_id}, "
        f"dead letters to {settings.dead_letter_topic}, "
        f"projection {'to Redis' if r.projection_url else 'off (no REDIS_URL)'}",
        file=sys.stderr,
    )

    async def run(engine: AsyncEngine, redis: RedisClient | None) -> int:
        runner: web.AppRunner | None = None
        metrics = LedgerMetrics()
        if args.listen is not None:
            runner = web.AppRunner(build_api(engine, metrics), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, *args.listen).start()
            print(
                f"ledger: snapshot API and /metrics on http://{args.listen[0]}:{args.listen[1]}",
                file=sys.stderr,
            )
        try:
            stats = await run_ledger(settings, Book(engine), r.projection(redis), metrics)
        finally:
            if runner is not None:
                await runner.cleanup()
        out(
            args,
            {"applied": stats.applied, "duplicates": stats.duplicates, "dlq": stats.dead_lettered},
            f"ledger stopped: {stats.applied} applied, {stats.duplicates} duplicates, "
            f"{stats.dead_lettered} dead-lettered",
        )
        return 0

    return with_ledger(r, run)


def _cmd_migrate(args: argparse.Namespace, r: Resolved) -> int:
    async def run(engine: AsyncEngine, _redis: RedisClient | None) -> int:
        before, after = await migrate(engine)
        text = (
            f"ledger database at schema {after} (was {before})"
            if before != after
            else f"ledger database already at schema {after}"
        )
        out(args, {"from": before, "to": after}, text)
        return 0

    return with_ledger(r, run, migrated=False, redis=None)


def _cmd_rebuild(args: argparse.Namespace, r: Resolved) -> int:
    async def run(engine: AsyncEngine, redis: RedisClient | None) -> int:
        projection = r.projection(redis)
        assert projection is not None  # redis="always"
        users = await projection.rebuild(Reader(engine))
        out(args, {"users": users}, f"projection rewritten for {users} users")
        return 0

    return with_ledger(r, run, redis="always")


def _cmd_dead_letters(args: argparse.Namespace, r: Resolved) -> int:
    async def run(engine: AsyncEngine, _redis: RedisClient | None) -> int:
        rows = await list_dead_letters(engine, args.limit)
        data = [
            {
                "id": d.id,
                "reason": d.reason,
                "source": d.source,
                "created_at": format_timestamp(int(d.created_at.timestamp() * 1000)),
                "bytes": d.size,
            }
            for d in rows
        ]
        lines = [f"{d['id']:>6}  {d['created_at']}  {d['source']}  {d['reason']}" for d in data]
        out(args, data, "\n".join(lines) or "no dead letters")
        return 0

    return with_ledger(r, run, redis=None)


def _cmd_replay(args: argparse.Namespace, r: Resolved) -> int:
    async def run(engine: AsyncEngine, redis: RedisClient | None) -> int:
        result = await replay(engine, args.ids or None)
        projection = r.projection(redis)
        if projection is not None and result.balances:
            await projection.write(result.balances.items())
        still = ", ".join(f"{i}: {why}" for i, why in sorted(result.refused.items()))
        out(
            args,
            {
                "applied": result.applied,
                "duplicates": result.duplicates,
                "refused": {str(i): why for i, why in result.refused.items()},
            },
            f"replayed: {result.applied} applied, {result.duplicates} already applied, "
            f"{len(result.refused)} still refused" + (f" ({still})" if still else ""),
        )
        return 1 if result.refused else 0

    return with_ledger(r, run)
