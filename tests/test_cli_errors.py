"""The CLI as an operator meets it (subprocesses): every error is one line on stderr
and a non-zero exit (2 for usage and configuration, 1 for runtime failures)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "model_aliases.yaml")


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LOG_LEVEL")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "proxy", *argv],
        env=full_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The error the operator reads: the last stderr line, and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines, "no error message at all"
    return lines[-1]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize(
    "argv",
    [
        ("serve", "--config", CONFIG, "--port"),
        ("fake-upstream", "--port"),
        ("demo", "--port"),
    ],
)
def test_port_in_use_is_one_line_exit_1(argv: tuple[str, ...], taken_port: int) -> None:
    proc = run(*argv, str(taken_port))
    assert proc.returncode == 1
    line = one_line(proc)
    assert line.startswith("llm-proxy: cannot listen on 127.0.0.1:")
    assert "in use" in line


def test_unresolvable_host_is_one_line_exit_1() -> None:
    proc = run("serve", "--config", CONFIG, "--host", "no-such-host.invalid", "--port", "18999")
    assert proc.returncode == 1
    assert one_line(proc).startswith("llm-proxy: cannot listen on no-such-host.invalid:18999")


@pytest.mark.parametrize("port", ["-1", "0", "99999", "http"])
def test_bad_port_is_a_usage_error(port: str) -> None:
    proc = run("serve", "--config", CONFIG, "--port", port)
    assert proc.returncode == 2
    assert "must be a port number 1-65535" in one_line(proc)


@pytest.mark.parametrize("argv", [("serve", "--config", CONFIG), ("credits", "show", "1")])
def test_redis_url_without_scheme_is_one_line_exit_2(argv: tuple[str, ...]) -> None:
    proc = run(*argv, env={"REDIS_URL": "localhost:6379"})
    assert proc.returncode == 2
    assert one_line(proc) == (
        "llm-proxy: REDIS_URL: must start with redis://, rediss:// or unix://, got 'localhost:6379'"
    )


def test_bad_log_level_is_refused_wherever_it_comes_from() -> None:
    for proc in (
        run("--log-level", "bogus", "serve", "--config", CONFIG),
        run("serve", "--log-level", "bogus", "--config", CONFIG),
    ):
        assert proc.returncode == 2
        assert "--log-level: invalid choice: 'bogus'" in one_line(proc)
    proc = run("serve", "--config", CONFIG, env={"LOG_LEVEL": "bogus"})
    assert proc.returncode == 2
    assert one_line(proc).startswith("llm-proxy: LOG_LEVEL: must be one of debug, info")


def test_log_level_after_the_sub_command_applies(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: {}\n")
    # Configuration errors are printed whatever the level; the level itself is accepted.
    proc = run("serve", "--config", str(bad), "--log-level", "ERROR")
    assert proc.returncode == 2
    assert one_line(proc).startswith("llm-proxy: configuration error:")


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip().startswith("llm-proxy ")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((), "llm-proxy: error: a command is required: serve, fake-upstream, demo,"),
        (("credits",), "llm-proxy credits: error: a command is required: grant, adjust, show,"),
        (("keys",), "llm-proxy keys: error: a command is required: create, revoke, list"),
        (("ledger", "bogus"), "llm-proxy ledger: error: argument COMMAND: invalid choice: 'bogus'"),
    ],
)
def test_a_missing_or_unknown_sub_command_names_the_choices(
    argv: tuple[str, ...], expected: str
) -> None:
    proc = run(*argv)
    assert proc.returncode == 2
    # One line: no usage block above it, and a pointer to the help instead.
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert one_line(proc).startswith(expected)
    assert "_command" not in proc.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ("credits", "grant", "5", "-3", "--id", "x"),
            "amount: must be a whole number >= 1, got '-3'",
        ),
        (
            ("credits", "grant", "5", "0", "--id", "x"),
            "amount: must be a whole number >= 1, got '0'",
        ),
        (
            ("credits", "grant", "5", "1.5", "--id", "x"),
            "amount: must be a whole number >= 1, got '1.5'",
        ),
        (("credits", "adjust", "5", "0", "--id", "x", "--reason", "r"), "other than 0, got '0'"),
        (("credits", "show", "0"), "user: user id must be an integer in 1..9223372036854775807"),
        (("credits", "show", "-4"), "user: user id must be an integer in 1..9223372036854775807"),
        (("serve", "--workers", "0"), "--workers: must be a whole number >= 1, got '0'"),
    ],
)
def test_argument_errors_are_one_line_in_one_wording(argv: tuple[str, ...], expected: str) -> None:
    proc = run(*argv)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert expected in one_line(proc)
