"""The benchmark harness still runs end to end (`python -m bench.run --quick`).

No timing assertions: the numbers belong to bench/, this only checks that every
scenario produced results of the documented shape and that traffic really went
through (requests succeeded, the full pipeline wrote charge events).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

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
    # The relay-only/bare ratio is printed (last line) and recorded; no timing is asserted.
    assert done.stdout.decode().strip().splitlines()[-1].startswith("Against the bare relay")
    assert set(result["ratios"]) >= {"relay_vs_bare_rps", "full_vs_bare_rps"}
    assert result["ratios"]["relay_vs_bare_rps"] is not None
