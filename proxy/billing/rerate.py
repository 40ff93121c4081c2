"""Re-rating history: what past charge events would cost under the current price book.

Input is charge events as JSON lines (the sink file `LLM_PROXY_SINK_PATH`, or a dump
of the charge topic): the reference ledger keeps balances and amounts, not usage,
so the events themselves are the history that can be re-priced. Each event is
priced again with the version of its rule in force at its `started_at` (read
from the configuration given now) and compared with what it was charged.

Nothing here writes: `llm-proxy credits rerate` prints the difference (dry run by
default) and, with `--apply`, refunds overcharges through idempotent grants.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from proxy.billing.pricing import price
from proxy.config.model import FREE_RULE_ID, PriceRule
from proxy.contract.charge_event import ChargeEvent, InvalidChargeEvent


@dataclass(frozen=True, slots=True)
class Rerated:
    """One event priced again."""

    event_id: str
    user_id: int
    started_at: str
    price_rule: str
    old_version: str | None
    new_version: str | None
    old_credits: int
    new_credits: int

    @property
    def delta(self) -> int:
        """> 0: undercharged; < 0: overcharged (refundable)."""
        return self.new_credits - self.old_credits


@dataclass(slots=True)
class RerateReport:
    rerated: list[Rerated] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> events

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def changed(self) -> list[Rerated]:
        return [r for r in self.rerated if r.delta]

    def totals(self) -> dict[str, int]:
        return {
            "events": len(self.rerated),
            "changed": len(self.changed),
            "charged": sum(r.old_credits for r in self.rerated),
            "rerated": sum(r.new_credits for r in self.rerated),
            "overcharged": sum(-r.delta for r in self.rerated if r.delta < 0),
            "undercharged": sum(r.delta for r in self.rerated if r.delta > 0),
        }


def parse_instant(text: str) -> int:
    """An ISO-8601 time with a zone (or a date, taken as 00:00 UTC) as unix ms."""
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        if "T" in text or " " in text:
            raise ValueError(f"{text!r} has no time zone (add Z or +00:00)")
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def read_events(path: str | Path, report: RerateReport) -> Iterator[ChargeEvent]:
    """Valid charge events of a JSON-lines file, each event id once (outboxes resend)."""
    seen: set[str] = set()
    with Path(path).open("rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                event = ChargeEvent.from_json(line)
            except InvalidChargeEvent:
                report.skip("not a valid charge event")
                continue
            if event.event_id in seen:
                report.skip("duplicate event_id")
                continue
            seen.add(event.event_id)
            yield event


def rerate(
    events: Iterable[ChargeEvent],
    rules: Mapping[str, PriceRule],
    start_ms: int,
    end_ms: int,
    report: RerateReport | None = None,
) -> RerateReport:
    """Price each event started in [start_ms, end_ms) with `rules`."""
    report = report or RerateReport()
    for event in events:
        started = parse_instant(event.started_at)
        if not start_ms <= started < end_ms:
            continue
        if event.price_rule == FREE_RULE_ID:
            report.skip("free alias")
            continue
        rule = rules.get(event.price_rule)
        if rule is None:
            report.skip("price rule no longer configured")
            continue
        try:
            charge = price(rule, event.usage, service_tier=event.service_tier, started_ms=started)
        except ValueError:
            report.skip("not priceable by the current rule (e.g. its service tier is gone)")
            continue
        report.rerated.append(
            Rerated(
                event_id=event.event_id,
                user_id=event.user_id,
                started_at=event.started_at,
                price_rule=event.price_rule,
                old_version=event.price_version,
                new_version=charge.rule_version,
                old_credits=event.credits,
                new_credits=charge.credits,
            )
        )
    return report
