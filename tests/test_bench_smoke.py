"""The benchmark harness still runs end to end (`python -m bench.run --quick`).

No timing assertions: the numbers belong to bench/, this only checks that every
scenario produced results of the documented shape and that traffic really went
through (requests succeeded, the full pipeline wrote charge events). Also the
small pure helpers of `serve --workers N` that the harness's workers run relies on.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from proxy.workers import orphaned_outboxes, worker_env, worker_path

REPO = Path(__file__).resolve().parent.parent

needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="the full pipeline needs redis-server (apt-get install redis-server)",
)


@needs_redis
@pytest.mark.timeout(400)
def test_quick_run_produces_results_of_the_documented_shape(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result = orjson.loads((tmp_path / "latest.json").read_bytes())
    markdown = (tmp_path / "latest.md").read_text()

    assert result["quick"] is True
    assert {"cpu", "cores", "python", "loop"} <= result["machine"].keys()
    kinds = {row["id"]: row for row in result["scenarios"]}
    assert {"nonstream_100rps", "nonstream_500rps", "nonstream_max", "stream_c1"} <= kinds.keys()
    for row in result["scenarios"]:
        assert set(row["results"]) == {"direct", "bare", "relay", "full"}, row["id"]
        for name, r in row["results"].items():
            assert r["ok"] > 0 and not r["errors"], (row["id"], name, r)
            assert r["latency_ms"]["p50"] is not None
            if name != "direct":
                assert r["cpu_s"] is not None and r["cpu_s"] >= 0
        assert set(row["added_latency_ms"]) == {"bare", "relay", "full"}
        if row["kind"] == "stream":
            assert row["results"]["full"]["ttft_ms"]["n"] > 0
            assert set(row["added_ttft_ms"]["full"]) == {"p50", "p90", "p99"}

    assert result["rss"]["requests"] >= 500
    assert result["rss"]["rss_after_kb"] > 0
    for mode in ("strip", "pass"):
        assert result["metering"][mode]["cpu_us_per_chunk_on"] is not None
    for n in ("1", "2"):
        assert result["workers"][n]["fixed_rate"]["ok"] > 0
        assert result["workers"][n]["max"]["ok"] > 0
    assert result["workers"]["cpu_per_req_ratio_2_vs_1"] is not None
    assert [c["target"] for c in result["targets"]][:3] == [
        "added latency p50 @ 500 RPS (full)",
        "added latency p99 @ 500 RPS (full)",
        "added TTFT p50 @ 64 streams (full)",
    ]
    assert "| 500 RPS | proxy, full pipeline |" in markdown
    assert "Quick mode" in markdown


def test_worker_zero_keeps_the_configured_files_and_others_get_their_own() -> None:
    assert worker_path("data/outbox.sqlite3", 0) == "data/outbox.sqlite3"
    assert worker_path("data/outbox.sqlite3", 3) == "data/outbox-w3.sqlite3"
    env = worker_env({"LLM_PROXY_OUTBOX_PATH": "/var/lib/p/ob.db"}, 1)
    assert env == {
        "LLM_PROXY_WORKER": "1",
        "LLM_PROXY_OUTBOX_PATH": "/var/lib/p/ob-w1.db",
        "LLM_PROXY_SINK_PATH": "data/charge-events-w1.jsonl",
    }


def test_outboxes_of_workers_not_started_are_reported(tmp_path: Path) -> None:
    for name in ("outbox.sqlite3", "outbox-w1.sqlite3", "outbox-w2.sqlite3", "outbox-wx.sqlite3"):
        (tmp_path / name).write_bytes(b"")
    base = str(tmp_path / "outbox.sqlite3")
    assert orphaned_outboxes(base, 2) == [tmp_path / "outbox-w2.sqlite3"]
    assert orphaned_outboxes(base, 3) == []
