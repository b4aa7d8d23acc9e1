"""The REST benchmark section's pieces, against real servers on port 0.

The canned REST upstream, the raw aiohttp passthrough and nginx ``proxy_pass`` each run
as their own process; the whole section runs at tiny settings (figures not checked, only
that every path ran, the guard really guarded, and the report holds them).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import nginx, rest
from bench.paths import free_port
from bench.rest_upstream import MODELS, SOFTMAX, TINY, predict_body

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def upstream_port(tmp_path: Path) -> Iterator[int]:
    argv = ["bench.rest_upstream", "--listen", "127.0.0.1:0"]
    proc, port, _ = rest._spawn(argv, tmp_path, "rest-upstream", "http")
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_canned_bodies_are_tf_serving_row_format() -> None:
    tiny = json.loads(predict_body(TINY))
    assert tiny == {"predictions": [[pytest.approx(0.7310586)]]}
    rows = json.loads(predict_body(SOFTMAX))["predictions"]
    assert len(rows) == 1024 and {len(r) for r in rows} == {201}
    assert sum(rows[0]) == pytest.approx(1.0, abs=1e-5)
    assert 2_500_000 < len(predict_body(SOFTMAX)) < 4_000_000


@pytest.mark.parametrize("hop", ["passthrough", "nginx"])
def test_hops_forward_status_and_body_unchanged(
    hop: str, upstream_port: int, tmp_path: Path
) -> None:
    running = rest.start_path(hop, upstream_port, tmp_path, "t")
    try:
        for model in MODELS:
            path = f"/v1/models/{model.name}:predict"
            status, body = _request(running.port, "POST", path, rest.request_body(model))
            assert (status, body) == (200, predict_body(model))
        # The upstream's own 404 (aiohttp's) passes through as it was.
        direct = _request(upstream_port, "GET", "/v1/models/nosuch/metadata")
        assert direct[0] == 404
        assert _request(running.port, "GET", "/v1/models/nosuch/metadata") == direct
    finally:
        running.stop()
    assert running.proc is not None and running.proc.poll() is not None


def test_the_passthrough_on_the_guards_client_forwards_unchanged(
    upstream_port: int, tmp_path: Path
) -> None:
    argv = ["bench.rest_passthrough", "--upstream", f"127.0.0.1:{upstream_port}",
            "--listen", "127.0.0.1:0", "--client", "guard"]  # fmt: skip
    proc, port, _ = rest._spawn(argv, tmp_path, "lean", "http")  # noqa: SLF001
    try:
        for model in MODELS:
            path = f"/v1/models/{model.name}:predict"
            status, body = _request(port, "POST", path, rest.request_body(model))
            assert (status, body) == (200, predict_body(model))
        missing = "/v1/models/nosuch/metadata"
        assert _request(port, "GET", missing) == _request(upstream_port, "GET", missing)
    finally:
        proc.terminate()
        proc.wait()


def test_a_path_that_fails_under_load_is_reported_not_fatal(
    upstream_port: int, tmp_path: Path
) -> None:
    settings = rest.RestSettings.quick()
    assert rest.measure_sizes([], settings, tmp_path) == {}
    good = rest.RestHop("direct", upstream_port)
    gone = rest.RestHop("passthrough", free_port())  # nothing listens there
    figures = rest.measure_sizes([gone, good], settings, tmp_path)
    for model in MODELS:
        assert "refused" in figures["passthrough"][model.size]["error"].lower()
        assert figures["direct"][model.size]["c1"]["n"] > 0


def test_nginx_http_config_keeps_upstream_connections(tmp_path: Path) -> None:
    text = nginx.render_config(tmp_path, "127.0.0.1:1", 2, protocol="http")
    assert "proxy_pass http://tf_serving;" in text and "grpc_pass" not in text
    assert "proxy_http_version 1.1;" in text and 'proxy_set_header Connection "";' in text
    assert "keepalive 64;" in text
    nginx.check_config(nginx.write_config(tmp_path / "ngx", "127.0.0.1:1", 2, protocol="http"))


def test_rest_section_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "rest.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.rest", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    (round_,) = results["rounds"]
    for name in rest.PATH_NAMES:
        assert "error" not in round_[name], round_[name]
        for model in MODELS:
            figures = round_[name][model.size]
            assert "error" not in figures, (name, model.size, figures)
            assert figures["c16"]["errors"] == 0 and figures["c16"]["n"] >= rest.CONCURRENCY
            assert figures["c1"]["p99_ms"] >= figures["c1"]["p50_ms"] > 0
    assert round_["guard"]["guard_action"] == {"1x1": "clean", "1024x201": "clean"}
    assert round_["guard-grpc-only"]["rss_idle_mb"] > 0
    assert results["ratios"]["guard_vs_passthrough_cpu_c16_1024x201"] is not None
    assert "| guard | 1024x201 |" in proc.stdout
    assert "guard_rest_idle_rss_delta_mb" in proc.stdout


def test_ab_rest_compares_a_checkout_with_the_passthrough() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ab_rest", "--size", "1x1", "--slices", "1", "--lean",
         "here=.", "bare=.:norules"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("CPU ms per request, 1x1")
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"passthrough", "lean-passthrough", "here", "bare"}
    assert rows["passthrough"][4] == "1.000"
    assert float(rows["here"][2]) > 0 and float(rows["bare"][2]) > 0


def test_ab_rest_refuses_rules_it_does_not_know() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ab_rest", "--slices", "1", "x=.:strict"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "'strict' is not one of" in proc.stderr


def test_restjson_times_the_guard_step(capsys: pytest.CaptureFixture[str]) -> None:
    """bench.restjson runs on this checkout (it imports the guard's modules by path)."""
    from bench import restjson

    restjson.main(["--rows", "8", "--classes", "201", "--repeat", "1"])
    out = capsys.readouterr().out
    steps = (
        "json.loads(body)",
        "restjson read, numpy scan",
        "restjson read, native scan",
        "guard step, reference kernels",
        "guard step, native kernels",
    )
    for step in steps:
        assert step in out


def test_steps_times_each_rule_on_both_protocols() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.steps", "--calls", "20", "--value", "1.0028"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"clamp", "observe", "threshold"}
    for row in rows.values():
        assert row[1] == "grpc" and float(row[2]) > 0 and row[3] == "rest" and float(row[4]) > 0
