"""latest.json -> Markdown tables, and the issue's targets checked against the numbers."""

from __future__ import annotations

from typing import Any

TARGET_NAMES = {
    "direct": "direct",
    "bare": "bare aiohttp relay",
    "relay": "proxy, relay only",
    "full": "proxy, full pipeline",
}


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _get(row: dict[str, Any], target: str, *path: str) -> Any:
    value: Any = row["results"].get(target, {})
    for p in path:
        value = value.get(p) if isinstance(value, dict) else None
    return value


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    """The proxy against the bare aiohttp relay of the same run: throughput at
    saturation (relay only, full pipeline) and CPU per relayed chunk (full, c64)."""
    rows = {r["id"]: r for r in result["scenarios"]}

    def ratio(row_id: str, target: str, key: str) -> float | None:
        row = rows.get(row_id)
        if row is None:
            return None
        mine, bare = _get(row, target, key), _get(row, "bare", key)
        return round(mine / bare, 3) if mine and bare else None

    return {
        "relay_vs_bare_rps": ratio("nonstream_max", "relay", "rps"),
        "full_vs_bare_rps": ratio("nonstream_max", "full", "rps"),
        "relay_vs_bare_cpu_per_req": ratio("nonstream_max", "relay", "cpu_ms_per_req"),
        "full_vs_bare_cpu_per_req": ratio("nonstream_max", "full", "cpu_ms_per_req"),
        "full_vs_bare_cpu_per_chunk": ratio("stream_c64", "full", "cpu_us_per_chunk"),
    }


def ratio_line(result: dict[str, Any]) -> str:
    r = result.get("ratios") or ratios(result)
    return (
        "Against the bare relay (same run, saturation: the median rounds): "
        f"relay only {_f(r['relay_vs_bare_rps'], 2)}x "
        f"its throughput at saturation ({_f(r['relay_vs_bare_cpu_per_req'], 2)}x its CPU "
        f"per request), full pipeline {_f(r['full_vs_bare_rps'], 2)}x "
        f"({_f(r['full_vs_bare_cpu_per_req'], 2)}x); CPU per relayed chunk (full, c64) "
        f"{_f(r['full_vs_bare_cpu_per_chunk'], 2)}x. Targets: >= 0.85x, >= 0.65x, <= 1.15x."
    )


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {r["id"]: r for r in result["scenarios"]}
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float, unit: str) -> None:
        checks.append(
            {
                "target": name,
                "value": value,
                "limit": limit,
                "unit": unit,
                "ok": value is not None and value <= limit,
            }
        )

    r500 = rows.get("nonstream_500rps")
    if r500:
        added = r500["added_latency_ms"].get("full", {})
        check("added latency p50 @ 500 RPS (full)", added.get("p50"), 0.5, "ms")
        check("added latency p99 @ 500 RPS (full)", added.get("p99"), 2.0, "ms")
    c64 = rows.get("stream_c64")
    if c64:
        check("added TTFT p50 @ 64 streams (full)", c64["added_ttft_ms"]["full"]["p50"], 1.0, "ms")
    rss = result.get("rss", {})
    if "growth_pct" in rss:
        check(f"RSS growth over {rss['requests']} requests", rss["growth_pct"], 5.0, "%")
    ratio = result.get("workers", {}).get("cpu_per_req_ratio_2_vs_1")
    if ratio is not None:
        check("CPU/request, 2 workers vs 1", round((ratio - 1) * 100, 2), 10.0, "% more")
    # Issue 23: <= 8 % when stripping the usage chunk, <= 5 % passing it through.
    for mode, limit in (("strip", 8.0), ("pass", 5.0)):
        m = result.get("metering", {}).get(mode)
        if m:
            check(
                f"metering CPU overhead, 500-chunk stream ({mode})", m["overhead_pct"], limit, "%"
            )
    r = ratios(result)

    def short(ratio: float | None) -> float | None:  # shortfall against the bare relay
        return None if ratio is None else round((1 - ratio) * 100, 1)

    check("relay-only throughput below the bare relay's", short(r["relay_vs_bare_rps"]), 15.0, "%")
    check(
        "full-pipeline throughput below the bare relay's", short(r["full_vs_bare_rps"]), 35.0, "%"
    )
    chunk = r["full_vs_bare_cpu_per_chunk"]
    check(
        "CPU per relayed chunk over the bare relay's (full, c64)",
        None if chunk is None else round((chunk - 1) * 100, 1),
        15.0,
        "%",
    )
    return checks


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, "
        f"aiohttp {m['aiohttp']}, event loop {m['loop']}, proxy log level {m['log_level']}. "
        f"{m['pinning']}. Load average at start/end: "
        f"{' '.join(m.get('loadavg_at_start', []))} / {' '.join(m.get('loadavg_at_end', []))}"
        f" (other work on the box shows here; CPU/request is the robust figure)."
        + (" **Quick mode: numbers are not meaningful.**" if result.get("quick") else ""),
        "",
        ratio_line(result),
        "",
        "Non-streaming small request (latency: client send → full body; added = target - direct)",
        "",
        "| load | target | RPS | p50 ms | p90 ms | p99 ms | added p50 | added p99 "
        "| proxy CPU ms/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["scenarios"]:
        if row["kind"] != "nonstream":
            continue
        if row["rate"]:
            load = f"{row['rate']} RPS"
        else:
            direct = row["results"].get("direct", {})
            gen = direct.get("generator", "wrk").split()[0]
            n = len(direct.get("rounds_rps") or [1])
            load = f"max ({gen}, 64 conns" + (f", median of {n} rounds)" if n > 1 else ")")
        for t, label in TARGET_NAMES.items():
            if t not in row["results"]:
                continue
            lat = _get(row, t, "latency_ms") or {}
            add = row["added_latency_ms"].get(t, {})
            lines.append(
                f"| {load} | {label} | {_f(_get(row, t, 'rps'), 0)} | {_f(lat.get('p50'))} "
                f"| {_f(lat.get('p90'))} | {_f(lat.get('p99'))} | {_f(add.get('p50'))} "
                f"| {_f(add.get('p99'))} | {_f(_get(row, t, 'cpu_ms_per_req'), 3)} |"
            )
    lines += [
        "",
        "Streaming (TTFT: client send → first body bytes; CPU per stream and per relayed chunk)",
        "",
        "| load | target | streams/s | TTFT p50 | TTFT p99 | added TTFT p50 | added TTFT p99 "
        "| CPU ms/stream | CPU µs/chunk |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["scenarios"]:
        if row["kind"] != "stream":
            continue
        load = f"c{row['concurrency']}, {row['chunks']} x {_f(row['interval_ms'], 0)} ms"
        for t, label in TARGET_NAMES.items():
            if t not in row["results"]:
                continue
            ttft = _get(row, t, "ttft_ms") or {}
            add = row["added_ttft_ms"].get(t, {})
            lines.append(
                f"| {load} | {label} | {_f(_get(row, t, 'rps'), 1)} | {_f(ttft.get('p50'))} "
                f"| {_f(ttft.get('p99'))} | {_f(add.get('p50'))} | {_f(add.get('p99'))} "
                f"| {_f(_get(row, t, 'cpu_ms_per_stream'), 2)} "
                f"| {_f(_get(row, t, 'cpu_us_per_chunk'), 1)} |"
            )
    rss = result.get("rss", {})
    if "growth_pct" in rss:
        lines += [
            "",
            f"Memory (full pipeline, after warm-up): RSS {rss['rss_before_kb'] / 1024:.1f} MiB → "
            f"{rss['rss_after_kb'] / 1024:.1f} MiB over {rss['requests']} requests "
            f"({rss['growth_pct']:+.2f}%).",
        ]
    met = result.get("metering", {})
    if "strip" in met:
        lines += [
            "",
            f"Metering ({met['chunks']}-chunk streams, c{met['concurrency']}, "
            f"{_f(met['interval_ms'], 0)} ms/chunk; CPU µs per relayed chunk, median round):",
            "",
            "| client | metering off | metering on | overhead |",
            "|---|---:|---:|---:|",
        ]
        for mode, label in (("strip", "no include_usage (strip)"), ("pass", "include_usage")):
            x = met[mode]
            off, on = _f(x["cpu_us_per_chunk_off"], 1), _f(x["cpu_us_per_chunk_on"], 1)
            lines.append(f"| {label} | {off} | {on} | {_f(x['overhead_pct'], 1)}% |")
    w = result.get("workers", {})
    if "1" in w:
        lines += [
            "",
            "Workers (`serve --workers N`, full pipeline, not pinned; the load generator "
            "shares the 2 cores; CPU at the fixed rate: median of alternating rounds):",
            "",
            f"| workers | CPU ms/req @ {result['plan']['workers_rate']} RPS per worker "
            "| max RPS (128 conns) | CPU ms/req at max | p99 at max |",
            "|---:|---:|---:|---:|---:|",
        ]
        for n in ("1", "2"):
            x = w[n]
            cpu = _f(x["fixed_rate"]["cpu_ms_per_req"], 3)
            p99 = _f((x["max"].get("latency_ms") or {}).get("p99"))
            peak_cpu = _f(x["max"].get("cpu_ms_per_req"), 3)
            lines.append(f"| {n} | {cpu} | {_f(x['max'].get('rps'), 0)} | {peak_cpu} | {p99} |")
        lines.append(
            f"\nCPU per request, 2 workers / 1 worker: {_f(w['cpu_per_req_ratio_2_vs_1'], 3)}"
        )
    lines += ["", "Targets:", "", "| target | value | limit | ok |", "|---|---:|---:|---|"]
    for c in result.get("targets", []):
        lines.append(
            f"| {c['target']} | {_f(c['value'])} {c['unit']} | {_f(c['limit'])} {c['unit']} "
            f"| {'yes' if c['ok'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"
