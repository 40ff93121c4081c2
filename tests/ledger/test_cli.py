"""`llm-proxy ledger migrate`, `credits grant|adjust|show|ledger|usage` in-process, against
real SQLite and PostgreSQL (and redis-server for the projection a grant writes)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import orjson
import pytest
import redis

import proxy
from proxy.config import EnvSettings
from proxy.contract.charge_event import MAX_CREDITS
from proxy.ledger import cli as ledger_cli
from proxy.ledger.book import MAX_AMOUNT, Book, adjust, grant
from proxy.ledger.database import migrate, open_engine
from proxy.ledger.embedded import LedgerSink
from proxy.ledger.reads import Reader
from proxy.ledger.schema import SCHEMA_VERSION
from tests.fixtures_redis import RedisServer
from tests.integration.test_ledger_embedded import row
from tests.ledger_events import charge_event


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llm-proxy")
    ledger_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args, EnvSettings.from_env({})))


class Cli:
    def __init__(self, url: str, capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
        self.url, self.capsys, self.extra = url, capsys, extra

    def __call__(self, *argv: str) -> tuple[int, object, str]:
        code = run_cli([*argv, "--database-url", self.url, "--prefix", "t:", *self.extra])
        got = self.capsys.readouterr()
        data = orjson.loads(got.out) if "--json" in argv and got.out else None
        return code, data, got.err


@pytest.fixture
def cli(ledger_url: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(ledger_url, capsys, [])


def test_unmigrated_database_is_one_line_and_exit_2(cli: Cli) -> None:
    code, _, err = cli("credits", "show", "1")
    assert code == 2 and "llm-proxy ledger migrate" in err and err.count("\n") == 1
    v = SCHEMA_VERSION
    assert cli("ledger", "migrate", "--json")[:2] == (0, {"from": 0, "to": v})
    assert cli("ledger", "migrate", "--json")[:2] == (0, {"from": v, "to": v})


def test_grant_adjust_show_ledger_usage(cli: Cli) -> None:
    cli("ledger", "migrate")
    assert cli("credits", "grant", "77", "50", "--id", "p1", "--reason", "hi", "--json")[:2] == (
        0,
        {"user_id": 77, "applied": True, "balance": 50},
    )
    code, again, _ = cli("credits", "grant", "77", "50", "--id", "p1", "--json")
    assert code == 0 and again == {"user_id": 77, "applied": False, "balance": 50}

    code, _, err = cli("credits", "adjust", "77", "-60", "--id", "a1", "--reason", "x")
    assert code == 2 and "below 0" in err
    code, adj, _ = cli(
        "credits",
        "adjust",
        "77",
        "-60",
        "--id",
        "a1",
        "--reason",
        "x",
        "--allow-negative",
        "--json",
    )
    assert code == 0 and adj == {"user_id": 77, "applied": True, "balance": -10}

    code, shown, _ = cli("credits", "show", "77", "--json")
    assert code == 0 and isinstance(shown, dict)
    assert (shown["balance"], shown["is_blocked"], shown["lifetime_granted"]) == (-10, True, 50)
    assert [e["kind"] for e in shown["entries"]] == ["adjustment", "grant"]
    assert shown["entries"][1]["reason"] == "hi"

    code, page, _ = cli("credits", "ledger", "77", "--limit", "1", "--json")
    assert code == 0 and isinstance(page, dict) and len(page["entries"]) == 1
    code, rest, _ = cli("credits", "ledger", "77", "--cursor", page["next_cursor"], "--json")
    assert isinstance(rest, dict)
    assert [e["kind"] for e in rest["entries"]] == ["grant"] and rest["next_cursor"] is None

    code, usage, _ = cli("credits", "usage", "77", "--period", "7d", "--json")
    assert code == 0 and usage == {
        "user_id": 77,
        "period": "7d",
        "credits": 0,
        "requests": 0,
        "tokens": {"prompt": 0, "completion": 0, "cached": 0, "reasoning": 0, "total": 0},
        "by_alias": {},
        "by_scene": {},
        "by_endpoint": {},
    }
    code, _, _ = cli("credits", "show", "77")
    assert code == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["credits", "grant", "1", "0", "--id", "k"],
        ["credits", "grant", "0", "5", "--id", "k"],
        ["credits", "grant", "1", "5"],  # no idempotency key
        ["credits", "adjust", "1", "0", "--id", "k", "--reason", "r"],
        ["credits", "adjust", "1", "5", "--id", "k"],  # no reason
        ["credits", "usage", "1", "--period", "1y"],
        ["credits", "ledger", "1", "--limit", "0"],
        ["keys", "create", "--user", "-3"],
    ],
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli(argv)


def test_a_bad_cursor_is_one_line(cli: Cli) -> None:
    cli("ledger", "migrate")
    code, _, err = cli("credits", "ledger", "1", "--cursor", "abc")
    assert code == 2 and "cursor" in err


def test_grant_writes_the_projection_and_the_prefix_comes_from_the_config(
    ledger_url: str, redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = (Path(proxy.__file__).parent / "devtools" / "demo_aliases.yaml").read_text()
    config = tmp_path / "aliases.yaml"
    prefix = f"cli-{tmp_path.name}:"
    config.write_text(f"{demo}\nguard:\n  prefix: '{prefix}'\n")
    common = [
        "--database-url",
        ledger_url,
        "--redis-url",
        redis_server.url,
        "--config",
        str(config),
    ]
    assert run_cli(["ledger", "migrate", *common]) == 0
    assert run_cli(["credits", "grant", "61", "9", "--id", "g", *common]) == 0
    client = redis.Redis.from_url(redis_server.url)
    try:
        snapshot = orjson.loads(client.get(f"{prefix}credit:{{61}}:snapshot") or b"{}")
        assert snapshot["available_credit"] == 9
        assert client.get(f"{prefix}credit:{{61}}:blocked") is None
        # `credits show` adds what the user's requests in progress hold (live holds).
        now_ms = int(client.time()[0]) * 1000
        client.hset(
            f"{prefix}holds:{{61}}",
            mapping={"live": f"4:{now_ms + 60_000}", "gone": f"3:{now_ms - 1}"},
        )
        capsys.readouterr()
        assert run_cli(["credits", "show", "61", "--json", *common]) == 0
        shown = orjson.loads(capsys.readouterr().out)
        assert (shown["balance"], shown["held"]) == (9, 4)
        assert run_cli(["credits", "show", "61", *common]) == 0
        assert "held     4 (requests in progress; available 5)" in capsys.readouterr().out
    finally:
        client.delete(f"{prefix}credit:{{61}}:snapshot", f"{prefix}holds:{{61}}")
        client.close()
    capsys.readouterr()


def test_a_bad_config_file_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("guard: [1, 2]\n")
    assert run_cli(["credits", "show", "1", "--config", str(config)]) == 2
    assert "broken.yaml" in capsys.readouterr().err


async def test_dead_letters_are_listed_and_replayed_once_the_cause_is_fixed(
    cli: Cli, ledger_url: str
) -> None:
    # The balance after the fix: floor - 2 (small) + MAX_CREDITS (grant) - MAX_CREDITS (big).
    engine = open_engine(ledger_url)
    try:
        await migrate(engine)
        book = Book(engine)
        # Near the 64-bit floor (an operator correction): the big charge cannot apply.
        start = -(MAX_AMOUNT - MAX_CREDITS)
        await adjust(book, 61, start, "floor", "test", allow_negative=True)
        big, small = charge_event(61, MAX_CREDITS), charge_event(61, 2)
        sink = LedgerSink(engine, None)
        # The small one first: then only the big one would leave the floor.
        await sink.send_batch([row(1, b"not json"), row(2, small.to_json()), row(3, big.to_json())])
        assert (await Reader(engine).account(61)).balance == start - 2

        code, listed, _ = await asyncio.to_thread(cli, "ledger", "dead-letters", "--json")
        assert code == 0 and isinstance(listed, list) and len(listed) == 2
        assert {d["source"] for d in listed} == {"outbox"}
        assert any("not valid JSON" in d["reason"] for d in listed)
        assert all("payload" not in d for d in listed)  # reasons, never the payload

        # Still refused: nothing changes, exit 1 names the rows.
        code, result, _ = await asyncio.to_thread(cli, "ledger", "replay-dead-letters", "--json")
        assert code == 1 and result["applied"] == 0 and len(result["refused"]) == 2

        await grant(book, 61, MAX_CREDITS, "lift")  # the cause is fixed
        code, result, _ = await asyncio.to_thread(cli, "ledger", "replay-dead-letters", "--json")
        assert code == 1 and result["applied"] == 1 and len(result["refused"]) == 1
        assert (await Reader(engine).account(61)).balance == start - 2
        code, listed, _ = await asyncio.to_thread(cli, "ledger", "dead-letters", "--json")
        assert [d["id"] for d in listed] == [int(i) for i in result["refused"]]
        # A replay of an event in the books is a duplicate, never a second debit.
        await sink.send_batch([row(3, big.to_json())])
        assert (await Reader(engine).account(61)).balance == start - 2
    finally:
        await engine.dispose()
