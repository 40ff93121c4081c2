"""The consumption board: totals, the breakdown by alias and by scene, and a series
for the chart, all from one read of the hourly rollups (so the series always adds up
to the totals). Hourly buckets for 24h and 7d, daily (UTC) beyond; empty buckets are
included, so the chart has a point per hour or day."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.ledger.reads import PERIODS, usage_totals
from proxy.ledger.schema import usage_hourly

_COLUMNS: Final = ("credits", "requests", "prompt", "completion", "cached", "reasoning")
HOURLY_UP_TO: Final = timedelta(days=7)
_HOUR: Final = timedelta(hours=1)
_DAY: Final = timedelta(days=1)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def _add(into: list[int], values: Iterable[int]) -> None:
    for i, v in enumerate(values):
        into[i] += v


def _breakdown(groups: dict[str, list[int]], name: str) -> list[dict[str, Any]]:
    ordered = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return [{name: key, **usage_totals(sums)} for key, sums in ordered]


async def usage_report(
    engine: AsyncEngine, user_id: int, period: str, now: datetime | None = None
) -> dict[str, Any]:
    """`period` one of PERIODS (ValueError otherwise): the hours whose start lies
    within the period before `now`, this one included (as `credits usage`)."""
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
    now = _utc(now or datetime.now(UTC))
    span = PERIODS[period]
    u = usage_hourly.c
    query = select(u.hour, u.alias, u.scene, *(func.sum(u[c]) for c in _COLUMNS)).where(
        u.user_id == user_id
    )
    if span is not None:
        query = query.where(u.hour > now - span)
    query = query.group_by(u.hour, u.alias, u.scene)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()

    total = [0] * len(_COLUMNS)
    by_alias: dict[str, list[int]] = {}
    by_scene: dict[str, list[int]] = {}
    hourly = span is not None and span <= HOURLY_UP_TO
    step = _HOUR if hourly else _DAY
    buckets: dict[datetime, list[int]] = {}
    first: datetime | None = None
    for row in rows:
        hour = _utc(row[0])
        values = [int(v or 0) for v in row[3:]]
        _add(total, values)
        _add(by_alias.setdefault(row[1], [0] * len(_COLUMNS)), values)
        _add(by_scene.setdefault(row[2], [0] * len(_COLUMNS)), values)
        start = hour if hourly else hour.replace(hour=0)
        _add(buckets.setdefault(start, [0] * len(_COLUMNS)), values)
        first = start if first is None or start < first else first

    this_hour = now.replace(minute=0, second=0, microsecond=0)
    if span is not None:
        oldest_hour = this_hour - (span - _HOUR)
        first = oldest_hour if hourly else oldest_hour.replace(hour=0)
    last = this_hour if hourly else this_hour.replace(hour=0)
    if first is None:
        first = last
    series = []
    at = first
    while at <= last:
        sums = buckets.get(at, [0] * len(_COLUMNS))
        series.append({"start": _iso(at), "credits": sums[0], "tokens": sums[2] + sums[3]})
        at += step
    return {
        "user_id": user_id,
        "period": period,
        **usage_totals(total),
        "by_alias": _breakdown(by_alias, "alias"),
        "by_scene": _breakdown(by_scene, "scene"),
        "series": series,
        "bucket": "hour" if hourly else "day",
    }
