"""`llm-proxy` exit codes and messages for bad configuration, arguments and environment.
No command here gets far enough to serve or to reach a broker."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.logs import ACCESS_LOGGER
from tests.servers import free_port

GOOD_YAML = """
providers:
  p: {base_url: "http://127.0.0.1:9/v1"}
aliases:
  a: {provider: p, model: m, free: true}
"""
ENV_VARS = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "LLM_PROXY_KAFKA_IDEMPOTENCE",
    "LLM_PROXY_CONFIG",
    "LLM_PROXY_WORKERS",
    "LLM_PROXY_METERING",
    "REDIS_URL",
    "LOG_LEVEL",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A known environment, and the logging set-up `main` does undone afterwards."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    root, access = logging.getLogger(), logging.getLogger(ACCESS_LOGGER)
    saved = (list(root.handlers), root.level, list(access.handlers), access.propagate)
    yield
    root.handlers[:], access.handlers[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    access.propagate = saved[3]


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_YAML)
    return path


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD_YAML + "surprise: 1\n")
    return path


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", ["serve", "kafka-init"])
def test_bad_config_exits_2_with_one_line(
    command: str, bad_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--config", str(bad_config)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("llm-proxy: configuration error: ")
    assert str(bad_config) in line and "surprise" in line
    assert "Traceback" not in line


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["serve", "--config", str(missing)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "configuration error" in line and str(missing) in line


def test_config_file_from_the_environment(
    bad_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLM_PROXY_CONFIG", str(bad_config))
    assert main(["serve"]) == 2
    assert str(bad_config) in one_line(capsys.readouterr().err)


def test_kafka_init_without_bootstrap_exits_2(
    good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["kafka-init", "--config", str(good_config)]) == 2
    err = capsys.readouterr().err
    assert "KAFKA_BOOTSTRAP_SERVERS" in err and "--bootstrap" in err


@pytest.mark.parametrize(
    "extra", [["--partitions", "0"], ["--replication-factor", "0"], ["--partitions", "-3"]]
)
def test_kafka_init_with_bad_topic_arguments_exits_2(
    extra: list[str], good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["kafka-init", "--config", str(good_config), "--bootstrap", "127.0.0.1:9", *extra]
    assert main(args) == 2
    assert "kafka-init: need a topic name" in capsys.readouterr().err


def test_kafka_init_with_an_unreachable_broker_exits_1(
    good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["kafka-init", "--config", str(good_config), "--bootstrap", bootstrap]) == 1
    err = capsys.readouterr().err
    assert f"kafka-init: cannot create topic 'credit.charge.requested' on {bootstrap}" in err


@pytest.mark.parametrize("workers", ["0", "-1", "two", "1.5"])
def test_bad_workers_is_an_argparse_error(
    workers: str, good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--config", str(good_config), "--workers", workers])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--workers" in err and "whole number >= 1" in err


def test_bad_workers_from_the_environment_is_an_argparse_error(
    good_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLM_PROXY_WORKERS", "0")
    with pytest.raises(SystemExit) as info:
        main(["serve", "--config", str(good_config)])
    assert info.value.code == 2
    assert "whole number >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["LLM_PROXY_KAFKA_IDEMPOTENCE", "LLM_PROXY_METERING"])
def test_bad_boolean_environment_exits_2(
    name: str,
    good_config: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, "maybe")
    assert main(["serve", "--config", str(good_config)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("llm-proxy: ") and name in line and "maybe" in line


def test_no_command_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("llm-proxy: error: a command is required: serve,")


def test_unknown_command_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "frobnicate" in capsys.readouterr().err
