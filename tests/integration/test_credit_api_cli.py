"""`llm-proxy credit-api` and `llm-proxy demo` as an operator starts them: the credit
API and the store page answer, SIGTERM stops them cleanly (exit 0)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]


def _spawn(*argv: str, env: dict[str, str]) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LOG_LEVEL")}
    full.update(env)
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", *argv],
        cwd=REPO,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _get(url: str, key: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def _wait_up(url: str, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


def test_credit_api_command_serves_the_api_and_the_store(tmp_path: Path) -> None:
    env = {"LEDGER_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}"}
    config = tmp_path / "c.yaml"
    config.write_text(
        (REPO / "model_aliases.yaml").read_text()
        + "\npackages:\n  - {id: p1, name: One, credits: 10, price: 1.5}\n"
    )
    subprocess.run(
        [sys.executable, "-m", "proxy", "ledger", "migrate", "--config", str(config)],
        cwd=REPO,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = _spawn("credit-api", "--config", str(config), "--port", str(port), env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(f"{base}/healthz", proc)
        status, body, _ = _get(f"{base}/v1/credit/packages")
        assert status == 200
        assert orjson.loads(body) == [
            {
                "id": "p1",
                "name": "One",
                "credits": 10,
                "original_price": "1.50",
                "price": "1.50",
                "currency": "USD",
            }
        ]
        status, body, _ = _get(f"{base}/v1/credit/balance", "sk-llmp-nobody")
        assert status == 401 and orjson.loads(body)["error"]["code"] == "invalid_api_key"
        status, body, headers = _get(f"{base}/store")
        assert status == 200 and b'data-testid="api-key"' in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        status, body, _ = _get(f"{base}/store/config.json")
        assert orjson.loads(body) == {"demo": False}
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out


def test_demo_mounts_the_credit_api_and_prints_a_store_key(tmp_path: Path) -> None:
    env = {
        "LEDGER_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
        "LLM_PROXY_OUTBOX_PATH": str(tmp_path / "outbox.sqlite3"),
    }
    port = free_port()
    proc = _spawn("demo", "--port", str(port), "--delay", "0", env=env)
    base = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        key = None
        while key is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "demo exited: " + "".join(lines)
            lines.append(line)
            found = re.search(r"sign in with (sk-llmp-demo-\S+) \(user 42\)", line)
            key = found.group(1) if found else None
        assert key is not None, "".join(lines)
        status, body, _ = _get(f"{base}/v1/credit/balance", key)
        assert status == 200 and orjson.loads(body)["user_id"] == 42
        status, body, _ = _get(f"{base}/store/config.json")
        assert orjson.loads(body) == {"demo": True}
        status, body, _ = _get(f"{base}/v1/credit/packages")
        assert status == 200 and len(orjson.loads(body)) >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
