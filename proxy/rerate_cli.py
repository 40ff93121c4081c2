"""`llm-proxy credits rerate`: prices charge events again with the current price book
(proxy.billing.rerate) and refunds overcharges through the ledger. It needs both the
billing side (prices) and the ledger (refunds), which may not import each other, so
it is wired here, beside the CLI."""

from __future__ import annotations

import argparse

from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.billing.rerate import RerateReport, parse_instant, read_events, rerate
from proxy.config import EnvSettings, load_config
from proxy.errors import ConfigError
from proxy.ledger import cli as ledger_cli
from proxy.ledger.book import Book, grant
from proxy.ledger.cli_common import resolve, with_ledger
from proxy.ledger.projection import RedisClient


def register_rerate(credits: ledger_cli.CreditsParsers) -> None:
    r = credits.subparsers.add_parser(
        "rerate",
        parents=[credits.common],
        help="price past charge events with the current price book (dry run by default)",
    )
    r.add_argument("--from", dest="start", required=True, help="ISO-8601 time or date (UTC)")
    r.add_argument("--to", dest="end", required=True, help="exclusive; ISO-8601 time or date")
    r.add_argument("--events", help="JSON lines of charge events (default: $LLM_PROXY_SINK_PATH)")
    r.add_argument(
        "--apply",
        action="store_true",
        help="refund overcharges as grants (id rerate:<event_id>); undercharges are only shown",
    )
    r.set_defaults(func=cmd_rerate)


def cmd_rerate(args: argparse.Namespace, settings: EnvSettings) -> int:
    try:
        config = load_config(settings.config_file(args.config))
    except ConfigError as exc:
        return ledger_cli.fail(f"configuration error: {exc}")
    try:
        start, end = parse_instant(args.start), parse_instant(args.end)
    except ValueError as exc:
        return ledger_cli.fail(f"rerate: --from/--to: {exc}")
    if end <= start:
        return ledger_cli.fail("rerate: --to must be after --from")
    path = args.events or settings.sink_path
    report = RerateReport()
    try:
        rerate(read_events(path, report), config.price_rules, start, end, report)
    except OSError as exc:
        return ledger_cli.fail(f"rerate: cannot read {path}: {exc.strerror or exc}")
    data: dict[str, object] = {
        "totals": report.totals(),
        "skipped": report.skipped,
        "changed": [
            {
                "event_id": r.event_id,
                "user_id": r.user_id,
                "started_at": r.started_at,
                "price_rule": r.price_rule,
                "old_version": r.old_version,
                "new_version": r.new_version,
                "old_credits": r.old_credits,
                "new_credits": r.new_credits,
                "delta": r.delta,
            }
            for r in report.changed
        ],
    }
    text = _rerate_text(report)
    if not args.apply:
        data["applied"] = None
        ledger_cli.out(args, data, text + "\ndry run: nothing changed (--apply refunds)")
        return 0
    try:
        resolved = resolve(args, settings)
    except ConfigError as exc:
        return ledger_cli.fail(str(exc))

    async def refund(engine: AsyncEngine, redis: RedisClient | None) -> int:
        book = Book(engine)
        refunds = credits = 0
        touched: dict[int, int] = {}
        for r in report.changed:
            if r.delta >= 0:
                continue  # history is never re-priced upwards by a tool
            change = await grant(
                book,
                r.user_id,
                -r.delta,
                f"rerate:{r.event_id}",  # one refund per event, however often run
                reason=f"rerate {r.event_id}: {r.old_credits} -> {r.new_credits} credits",
            )
            if change.applied:
                refunds, credits = refunds + 1, credits - r.delta
                touched[r.user_id] = change.balance
        projection = resolved.projection(redis)
        if projection is not None and touched:
            await projection.write(list(touched.items()))
        data["applied"] = {"refunds": refunds, "credits": credits}
        ledger_cli.out(
            args, data, text + f"\napplied: {refunds} refunds, {credits} credits refunded"
        )
        return 0

    return with_ledger(resolved, refund)


def _rerate_text(report: RerateReport) -> str:
    lines = [
        f"{r.event_id}  user {r.user_id}  {r.started_at}  {r.price_rule} "
        f"[{r.old_version or 'undated'} -> {r.new_version or 'undated'}]  "
        f"{r.old_credits} -> {r.new_credits} ({r.delta:+d})"
        for r in report.changed
    ]
    t = report.totals()
    lines.append(
        f"{t['events']} events re-rated, {t['changed']} changed: charged {t['charged']}, "
        f"re-rated {t['rerated']} (overcharged {t['overcharged']}, "
        f"undercharged {t['undercharged']})"
    )
    lines += [f"skipped {n}: {reason}" for reason, n in sorted(report.skipped.items())]
    return "\n".join(lines)
