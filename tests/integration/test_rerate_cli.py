"""`llm-proxy credits rerate` against a real redis-server: history re-priced with the
current price book, dry run by default, refunds applied once (issue 16)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from redis import Redis

from proxy.billing.pricing import price
from proxy.cli import build_parser
from proxy.config import EnvSettings, parse_price_rules
from proxy.contract.charge_event import ChargeEvent
from proxy.contract.outcome import Outcome
from proxy.contract.redis_keys import RedisKeys, decode_snapshot
from proxy.contract.usage import Usage, UsageSource
from tests.fixtures_redis import RedisServer

DEC_2026 = 1_796_083_200_000  # 2026-12-01T00:00:00Z
JAN_2027 = 1_798_761_600_000  # 2027-01-01T00:00:00Z
USAGE = Usage(prompt_tokens=1_000_000, completion_tokens=500_000)

OLD_BOOK = {"std": {"input": 2, "output": 8}}  # what the proxy charged with
# Later: a price cut from 2027-01-01 was entered after the fact.
NEW_CONFIG = """
providers:
  p: {base_url: "http://127.0.0.1:1/v1"}
price_rules:
  std:
    input: 2
    output: 8
    versions: [{effective_from: "2027-01-01T00:00:00Z", input: 1, output: 4}]
aliases:
  a: {provider: p, model: m, price_rule: std}
guard: {prefix: "%s"}
"""


def event(user_id: int, started_ms: int, **kw: object) -> bytes:
    charge = price(parse_price_rules(OLD_BOOK)["std"], USAGE, started_ms=started_ms)
    e = ChargeEvent.create(
        request_id=f"r-{user_id}-{started_ms}",
        user_id=user_id,
        scene="chat",
        conversation_id=None,
        alias="a",
        provider="p",
        upstream_model="m",
        stream=False,
        usage=USAGE,
        usage_source=UsageSource.UPSTREAM,
        price_rule=charge.rule_id,
        credits=charge.credits,
        outcome=Outcome.COMPLETED,
        latency_ms=100.0,
        ttft_ms=50.0,
        started_ms=started_ms,
        price_version=charge.rule_version,
        now_ns=(started_ms + 100) * 1_000_000,
    )
    return e.to_json()


@pytest.fixture
def files(tmp_path: Path, redis_prefix: str) -> tuple[Path, Path]:
    events = tmp_path / "charge-events.jsonl"
    lines = [
        event(7, DEC_2026),  # before the cut: unchanged (2 + 4 = 6)
        event(7, JAN_2027 + 1),  # after: 6 -> 3
        event(8, JAN_2027 + 2),  # two calls of user 8 (two event ids)
        event(8, JAN_2027 + 2),
        b"{not an event",
    ]
    dup = lines[1]
    events.write_bytes(b"\n".join([*lines, dup]) + b"\n")  # an outbox resend: same id
    config = tmp_path / "aliases.yaml"
    config.write_text(NEW_CONFIG % redis_prefix)
    return events, config


def rerate(files: tuple[Path, Path], redis: RedisServer, prefix: str, *extra: str) -> dict:
    events, config = files
    argv = ["credits", "rerate", "--config", str(config), "--events", str(events)]
    argv += ["--from", "2026-11-01", "--to", "2027-02-01T00:00:00Z", "--json"]
    argv += ["--redis-url", redis.url, "--prefix", prefix]
    argv += ["--database-url", f"sqlite:///{events.parent / 'ledger.sqlite3'}", *extra]
    return argv  # type: ignore[return-value]


def main(argv: list[str]) -> int:
    """The command as `llm-proxy` runs it, minus main()'s global logging set-up (which
    would reconfigure logging for every later test)."""
    settings = EnvSettings.from_env()
    args = build_parser(settings).parse_args(argv)
    return int(args.func(args, settings))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(argv) == 0
    return orjson.loads(capsys.readouterr().out)


def test_rerate_dry_run_shows_the_difference_and_changes_nothing(
    files: tuple[Path, Path],
    redis_server: RedisServer,
    redis_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run(rerate(files, redis_server, redis_prefix), capsys)  # type: ignore[arg-type]
    assert out["totals"] == {
        "events": 4,
        "changed": 3,
        "charged": 24,
        "rerated": 15,
        "overcharged": 9,
        "undercharged": 0,
    }
    assert out["skipped"] == {"duplicate event_id": 1, "not a valid charge event": 1}
    assert {(c["user_id"], c["old_credits"], c["new_credits"]) for c in out["changed"]} == {
        (7, 6, 3),
        (8, 6, 3),
    }
    assert {c["new_version"] for c in out["changed"]} == {"2027-01-01T00:00:00Z"}
    assert {c["old_version"] for c in out["changed"]} == {None}
    assert out["applied"] is None
    client = Redis.from_url(redis_server.url)
    assert client.keys(f"{redis_prefix}*") == []  # a dry run writes nothing


def test_rerate_apply_refunds_overcharges_once(
    files: tuple[Path, Path],
    redis_server: RedisServer,
    redis_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = rerate(files, redis_server, redis_prefix, "--apply")  # type: ignore[arg-type]
    database = argv[argv.index("--database-url") + 1]
    assert main(["ledger", "migrate", "--database-url", database]) == 0
    capsys.readouterr()
    assert run(argv, capsys)["applied"] == {"refunds": 3, "credits": 9}
    # The refunds are in the books and projected for the guard.
    client = Redis.from_url(redis_server.url)
    keys = RedisKeys(redis_prefix)

    def credit(user: int) -> int | None:
        raw = client.get(keys.snapshot(user))
        return decode_snapshot(raw) if raw is not None else None

    assert (credit(7), credit(8)) == (3, 6)
    # Running it again refunds nothing more: one refund per event id, forever.
    assert run(argv, capsys)["applied"] == {"refunds": 0, "credits": 0}
    assert credit(8) == 6


def test_rerate_window_and_bad_arguments(
    files: tuple[Path, Path],
    redis_server: RedisServer,
    redis_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = rerate(files, redis_server, redis_prefix)  # type: ignore[arg-type]
    before_cut = [*argv, "--to", "2027-01-01"]  # the last --to wins
    assert run(before_cut, capsys)["totals"]["events"] == 1
    assert main([*argv, "--to", "2027-01-01T00:00:00"]) == 2  # no zone
    assert main([*argv, "--to", "2026-01-01"]) == 2  # before --from
    assert "must be after" in capsys.readouterr().err
