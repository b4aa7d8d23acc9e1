"""Render bench.run results as docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = {
    "direct": "(a) direct to upstream",
    "nginx": "(b) nginx grpc_pass (anchor)",
    "passthrough": "(c) raw Python passthrough",
    "guard": "(d) guard, demo rules",
    "guard-w2": "(d2) guard, demo rules, --workers 2 (CPU/RSS: all 3 processes)",
    "passthrough-uvloop": "passthrough on uvloop",
    "passthrough-sync": "passthrough, sync server",
    "passthrough-notrailers": "passthrough, no trailer forwarding",
    "passthrough-nobdp": "passthrough, grpc.http2.bdp_probe=0",
    "passthrough-throughput": "passthrough, optimization_target=throughput",
}


def fmt(stat: dict[str, float] | None, digits: int = 2, scale: float = 1.0) -> str:
    """``median (min–max)``, or ``–`` when there is no value."""
    if not stat:
        return "–"
    med, lo, hi = (stat[k] * scale for k in ("median", "min", "max"))
    if stat.get("n", 1) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _median(stat: dict[str, float] | None) -> float | None:
    if not stat:
        return None
    return stat.get("of_medians", stat["median"])


def fmt_ratio(stat: dict[str, float] | None) -> str:
    """A ratio of medians, with the range of the per-round paired ratios."""
    if not stat:
        return "–"
    value = _median(stat)
    if stat.get("n", 1) == 1:
        return f"{value:.2f}×"
    return f"{value:.2f}× (rounds {stat['min']:.2f}–{stat['max']:.2f})"


def _verdict(value: float | None, limit: float, higher_is_better: bool = False) -> str:
    if value is None:
        return "not measured"
    ok = value >= limit if higher_is_better else value <= limit
    return "met" if ok else "**missed**"


def targets(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows for issue 5's targets."""
    s, r = results.get("summary", {}), results.get("ratios", {})
    g = s.get("guard", {})
    rows = []
    for key, text, limit in (
        ("guard_vs_passthrough_added_p50", "added p50 ≤ 1.3× passthrough's", 1.3),
        ("guard_vs_passthrough_added_p99", "added p99 ≤ 1.5× passthrough's", 1.5),
        ("guard_vs_passthrough_cpu_c16", "CPU/request ≤ 1.25× passthrough's (c=16)", 1.25),
        ("guard_vs_passthrough_cpu_c64", "CPU/request ≤ 1.25× passthrough's (c=64)", 1.25),
    ):
        rows.append((text, fmt_ratio(r.get(key)), _verdict(_median(r.get(key)), limit)))
    if r.get("guard_w2_vs_guard_rps_c64"):
        key = "guard_w2_vs_guard_rps_c64"
        rows.append(
            (
                "--workers 2 throughput ≥ 1.7× one worker (c=64)",
                fmt_ratio(r.get(key)),
                _verdict(_median(r.get(key)), 1.7, higher_is_better=True),
            )
        )
    for key, text, limit, scale, unit in (
        ("rss_idle_mb", "RSS idle ≤ 64 MB", 64, 1.0, " MiB"),
        ("rss_load_mb", "RSS under load ≤ 128 MB", 128, 1.0, " MiB"),
        ("startup_s", "startup to SERVING ≤ 1 s", 1.0, 1.0, " s"),
    ):
        stat = g.get(key)
        rows.append((text, fmt(stat, 1 if unit != " s" else 2, scale) + unit,
                     _verdict(_median(stat), limit)))  # fmt: skip
    core = results.get("micro", {}).get("core_target")
    if core:
        scopes = [("decode + sum check + clamp + argmax + encode", core)]
        if core.get("with_metrics"):
            scopes.append(("the same plus recording the metrics", core["with_metrics"]))
        for scope, timing in scopes:
            ms = timing["median_us"] / 1000
            rows.append(
                (
                    f"issue 2: 1024x201 float_val, {scope}, ≤ 1 ms",
                    f"{ms:.2f} ms (min {timing['min_us'] / 1000:.2f}, "
                    f"max {timing['max_us'] / 1000:.2f})",
                    _verdict(ms, 1.0),
                )
            )
    for case in results.get("micro", {}).get("cases", []):
        if case["shape"] not in ("1024x201", "4096x1000") or not case.get("guard"):
            continue
        name = f"{case['shape']} {case['encoding']}"
        rows.append(
            (
                f"post-processing {name}: ≤ 2× numpy floor",
                f"{case['guard_vs_floor']:.2f}×",
                _verdict(case["guard_vs_floor"], 2.0),
            )
        )
        rows.append((f"post-processing {name}: ≥ 10× faster than naive",
                     f"{case['naive_vs_guard']:.1f}×",
                     _verdict(case["naive_vs_guard"], 10.0, higher_is_better=True)))  # fmt: skip
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _paths_section(results: dict[str, Any], title_suffix: str = "") -> list[str]:
    s = results["summary"]
    names = results["paths"]
    out: list[str] = []
    out.append(f"### Latency at concurrency 1{title_suffix}\n")
    out.append("Milliseconds; added = this path minus (a) in the same round.\n")
    out.append(_table(
        ["path", "p50", "p90", "p99", "added p50", "added p99"],
        [[LABELS.get(n, n), fmt(s[n]["p50_ms"], 3), fmt(s[n]["p90_ms"], 3), fmt(s[n]["p99_ms"], 3),
          fmt(s[n]["added_p50_ms"], 3), fmt(s[n]["added_p99_ms"], 3)] for n in names],
    ))  # fmt: skip
    out.append(f"\n### Throughput and CPU{title_suffix}\n")
    out.append("h2load; c=16 is 1 connection × 16 streams, c=64 is 4 × 16. CPU is the proxy "
               "process alone (utime+stime from /proc), in ms per request; ×1000 gives CPU "
               "seconds per 1000 requests.\n")  # fmt: skip
    out.append(_table(
        ["path", "req/s c=16", "req/s c=64", "errors c16/c64", "CPU ms/req c=1",
         "CPU ms/req c=16", "CPU ms/req c=64", "gRPC codes"],
        [[LABELS.get(n, n), fmt(s[n]["rps_c16"], 0), fmt(s[n]["rps_c64"], 0),
          f"{_sum(s[n]['errors_c16'])}/{_sum(s[n]['errors_c64'])}",
          fmt(s[n]["cpu_ms_per_req_c1"], 3), fmt(s[n]["cpu_ms_per_req_c16"], 3),
          fmt(s[n]["cpu_ms_per_req_c64"], 3),
          ", ".join(f"{k} {v}" for k, v in sorted(s[n]["grpc_codes"].items())) or "–"]
         for n in names],
    ))  # fmt: skip
    out.append(f"\n### Footprint{title_suffix}\n")
    out.append(_table(
        ["path", "RSS idle MiB", "RSS under load MiB (max)", "startup to SERVING s"],
        [[LABELS.get(n, n), fmt(s[n]["rss_idle_mb"], 1), fmt(s[n]["rss_load_mb"], 1),
          fmt(s[n]["startup_s"], 3)] for n in names],
    ))  # fmt: skip
    failures = {n: s[n]["errors"] for n in names if s[n]["errors"]}
    if failures:
        out.append("\nPaths that failed in some rounds:\n")
        out += [
            f"- {LABELS.get(n, n)}: {errs[0]} ({len(errs)} rounds)" for n, errs in failures.items()
        ]
    return out


def _sum(stat: dict[str, float] | None) -> str:
    if not stat:
        return "–"
    return f"{stat['max']:.0f}" if stat["max"] else "0"


def render(results: dict[str, Any], json_path: Path | None = None) -> str:
    """The whole markdown report."""
    m = results["machine"]
    st = results["settings"]
    out = ["# Benchmarks", ""]
    out.append(
        f"Generated by `{results['command']}` on {results['date']} "
        f"({results.get('elapsed_s', 0):.0f} s). Reproduce with `make bench`; raw figures: "
        f"`bench/results/{json_path.name if json_path else '<date>.json'}`."
    )
    out.append("")
    out.append(_table(
        ["cpu", "cores", "kernel", "python", "grpcio", "protobuf", "numpy", "nginx", "h2load",
         "load avg start/end"],
        [[str(m[k]) for k in ("cpu", "cores", "kernel", "python", "grpcio", "protobuf", "numpy",
                              "nginx", "h2load")]
         + [f"{m.get('loadavg_1m_at_start', '?')}/{m.get('loadavg_1m_at_end', '?')}"]],
    ))  # fmt: skip
    out.append("")
    out.append("## Method\n")
    model = results["model"]
    paths = ", ".join(LABELS.get(n, n) for n in results["paths"])
    out.append(
        f"- One canned TF-Serving-like upstream (`bench/upstream.py`) answers Predict with a "
        f"pre-serialized response: model `{model['name']}`, output `{model['output_name']}`, "
        f"{model['batch']}×{model['classes']} DT_FLOAT in {model['encoding']} "
        f"({results['response_bytes']} bytes; request {results['request_bytes']} bytes).\n"
        f"- Paths, interleaved in one run: {paths}. {st['rounds']} rounds; each round starts "
        "every proxy fresh, in an order rotated per round. "
        f"Figures are **median (min–max) across rounds**.\n"
        f"- Per path and round: startup to SERVING (spawn → grpc.health.v1 Check answers), "
        f"idle RSS, {st['warmup_calls']} warm-up calls, {st['latency_calls']} timed sequential "
        f"calls (Python gRPC client), {st['status_calls']} concurrent calls checking grpc-status, "
        f"then h2load with {st['h2load_requests']} requests at c=16 and at c=64 while /proc is "
        "sampled for the proxy's CPU and RSS.\n"
        "- nginx runs as one process (`master_process off`, 1 worker) with keepalive limits "
        "raised, so like the Python paths it is one process on one core.\n"
        "- The guard runs `python -m guard serve` with the config below: the softmax_201 "
        "rules of `examples/guard.yaml` (check_sum, argmax, top_k 5, labels for all 201 "
        "classes), so every response is decoded, checked, and re-encoded with 6 derived "
        "outputs.\n"
        f"- The machine has {m['cores']} cores shared by the load generator, the upstream, the "
        "proxy and, on the development box, other jobs (see the load average above): "
        "throughput is bounded by the "
        "upstream and the client as much as by the proxy, and absolute figures are noisy. "
        "CPU per request of the proxy process and the ratios are the robust figures."
    )
    out.append("\n## Issue 5 targets\n")
    out.append(_table(["target", "measured", "verdict"],
                      [list(row) for row in targets(results)]))  # fmt: skip
    out.append("\n## Ratios\n")
    out.append(
        "Ratio of the medians across rounds; in brackets the range of the ratio paired "
        "within each round. Latency ratios compare *added* latency (path minus direct).\n"
    )
    ratio_rows = [[k.replace("_", " "), fmt_ratio(v)] for k, v in results["ratios"].items()]
    out.append(_table(["ratio", "value"], ratio_rows))
    out.append("\n## Paths against the canned upstream\n")
    out += _paths_section(results)
    outputs = results["summary"].get("guard", {}).get("outputs")
    if outputs:
        out.append(f"\nOutputs of a guarded response: {', '.join(f'`{o}`' for o in outputs)}.")
    micro = results.get("micro")
    if micro:
        out.append("\n## Post-processing micro-benchmarks\n")
        out.append(
            "Microseconds per response (median (min–max) of 5 timing loops), in one process "
            "(`python -m bench.micro`). naive: official message classes + numpy; floor: the "
            "numpy math alone on an already-decoded array; guard: "
            "`guard.dataplane.pipeline.guard_predict_response` (decode, rules, metrics, encode). "
            "Same rules as above (top_k capped at the class count). Valid softmax inputs.\n"
        )
        rows = []
        for c in micro["cases"]:
            g = c.get("guard")
            rows.append([
                c["shape"], c["encoding"], str(c["response_bytes"]),
                _timing(c["naive"]), _timing(c["floor"]), _timing(g) if g else "–",
                f"{c['guard_vs_floor']:.2f}×" if g else "–",
                f"{c['naive_vs_guard']:.1f}×" if g else "–",
            ])  # fmt: skip
        out.append(_table(["shape", "encoding", "bytes", "naive µs", "floor µs", "guard µs",
                           "guard / floor", "naive / guard"], rows))  # fmt: skip
    backend = results.get("backend")
    if backend:
        out.append("\n## Real backend pass\n")
        if backend.get("status") != "ran":
            out.append(f"Not run: {backend.get('reason', 'unknown')}.")
        else:
            out.append(backend["description"] + "\n")
            out += _paths_section(backend, " (real backend)")
    if results.get("rest"):
        from bench import rest

        out.append("\n" + rest.render(results["rest"]).rstrip())
    if results.get("cases"):
        out += cases_section(results["cases"])
    findings = Path(__file__).with_name("findings.md")
    if findings.exists():
        out.append("\n" + findings.read_text().rstrip())
    guard_config = results.get("guard_config")
    if guard_config:
        out.append("\n## Guard config used\n")
        out.append("```yaml\n" + guard_config.rstrip() + "\n```")
    out.append("")
    return "\n".join(out)


def cases_section(figures: dict[str, Any]) -> list[str]:
    """The performance cases' section (bench.cases)."""
    from bench import cases

    command = figures.get("command", "python -m bench.cases")
    return [
        "\n## Performance cases\n",
        cases.DESCRIPTION + "\n",
        f"Command: `{command}`.\n",
        cases.render(figures).rstrip(),
    ]


def _timing(t: dict[str, float]) -> str:
    return f"{t['median_us']:.1f} ({t['min_us']:.1f}–{t['max_us']:.1f})"


def headline(results: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = []
    s = results.get("summary", {})
    for n in results.get("paths", []):
        p = s.get(n, {})
        lines.append(
            f"{n:24} p50 {fmt(p.get('p50_ms'), 3):>24} ms  added p50 "
            f"{fmt(p.get('added_p50_ms'), 3):>24}  CPU/req c16 "
            f"{fmt(p.get('cpu_ms_per_req_c16'), 3):>24} ms"
        )
    for k, v in results.get("ratios", {}).items():
        lines.append(f"{k:36} {fmt_ratio(v)}")
    for row in targets(results):
        lines.append(" | ".join(row))
    return "\n".join(lines)
